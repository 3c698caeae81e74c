"""``medmamba plan-and-preprocess -d DATASET``: verify, fingerprint, plan (Mamba-aware) and preprocess a dataset."""

from __future__ import annotations

import argparse
import os

from medmamba.cli.common import common_parser

__all__ = ["add_parser", "preprocessed_root", "run"]

_NETWORKS = ("umamba_bot", "umamba_enc", "segmamba")


def preprocessed_root(args: argparse.Namespace) -> str | None:
    """``--preprocessed-root``, else ``$MEDMAMBA_PREPROCESSED``, else ``$nnUNet_preprocessed``."""
    return (
        getattr(args, "preprocessed_root", None)
        or os.environ.get("MEDMAMBA_PREPROCESSED")
        or os.environ.get("nnUNet_preprocessed")  # noqa: SIM112 - nnU-Net's name
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan-and-preprocess``."""
    parser = subparsers.add_parser(
        "plan-and-preprocess",
        parents=[common_parser()],
        help="check, fingerprint, plan and preprocess an nnU-Net raw dataset for U-Mamba / SegMamba",
        description="Verify the dataset (every problem reported at once, exit 2, nothing written), extract "
        "nnU-Net's fingerprint in-process, plan nnU-Net's configurations plus one per Mamba network "
        "(3d_fullres_<network>, 2d_<network>) whose patch and batch are fitted to --gpu-memory-gb by a memory "
        "model of the network, write <preprocessed>/DatasetXXX_Name/medmambaPlans.json (nnU-Net format) and "
        "preprocess with nnU-Net's preprocessor; cases already preprocessed are skipped. Prints the plans path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-d", "--dataset", required=True, metavar="ID_OR_PATH", help="dataset folder, DatasetXXX_Name or id XXX"
    )
    parser.add_argument(
        "--raw-root", default=None, help="folder of raw datasets (default: $MEDMAMBA_RAW, else $nnUNet_raw)"
    )
    parser.add_argument(
        "--preprocessed-root",
        default=None,
        help="output folder (default: $MEDMAMBA_PREPROCESSED, else $nnUNet_preprocessed)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=8.0,
        help="GPU memory (GiB) one training step may use; patch and batch of each network are fitted to it",
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        default=list(_NETWORKS),
        metavar="NAME",
        help=f"networks to plan: {', '.join(_NETWORKS)}",
    )
    parser.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        default=["2d", "3d_fullres"],
        metavar="CONFIG",
        help="nnU-Net configurations to preprocess (our networks' configurations share their data)",
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="training precision the memory model assumes (nnU-Net trains with autocast on CUDA)",
    )
    parser.add_argument(
        "--network-kwargs",
        default=None,
        metavar="JSON",
        help="constructor arguments per network, written into its plans and fitted by the memory model, e.g. "
        '\'{"segmamba": {"ssm_fp32": false}}\' (SegMamba\'s Mamba layers in the AMP dtype, as the official code)',
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the dataset check (not recommended)")
    parser.add_argument("--plan-only", action="store_true", help="write the plans, do not preprocess")
    parser.add_argument("--clean", action="store_true", help="recompute the fingerprint even if the data are unchanged")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the plans path")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Plan and preprocess; print the plans path (or ``--json`` summary) on stdout, the table on stderr."""
    import json
    import sys

    from medmamba.cli.verify import raw_root
    from medmamba.errors import UsageError
    from medmamba.plans import plan_and_preprocess

    output = preprocessed_root(args)
    if output is None:
        raise UsageError(
            "no output folder: pass --preprocessed-root, or set MEDMAMBA_PREPROCESSED (or nnUNet_preprocessed)"
        )
    network_kwargs = _network_kwargs(args.network_kwargs)
    result = plan_and_preprocess(
        args.dataset,
        output,
        raw_root=raw_root(args),
        networks=args.networks,
        gpu_memory_gb=args.gpu_memory_gb,
        configurations=args.configurations,
        num_workers=args.num_workers,
        verify=not args.no_verify,
        precision=args.precision,
        overwrite_fingerprint=args.clean,
        preprocess=not args.plan_only,
        network_kwargs=network_kwargs,
    )
    rows = result.summary()
    if args.json:
        done = [
            {
                "folder": str(p.folder),
                "configuration": p.configuration,
                "written": len(p.written),
                "skipped": len(p.skipped),
            }
            for p in result.preprocessed
        ]
        print(
            json.dumps({"plans_file": str(result.plans_file), "configurations": rows, "preprocessed": done}, indent=2)
        )
        return 0
    width = max(len(r["configuration"]) for r in rows)
    for r in rows:
        memory = f"{r['gpu_memory_gb']:6.2f} GB" if r["gpu_memory_gb"] is not None else ""
        patch = "x".join(str(p) for p in r["patch_size"])
        print(f"{r['configuration']:<{width}}  patch {patch:<14} batch {r['batch_size']:<3} {memory}", file=sys.stderr)
    for p in result.preprocessed:
        print(f"{p.folder}: {len(p.written)} case(s) written, {len(p.skipped)} already done", file=sys.stderr)
    print(result.plans_file)
    return 0


def _network_kwargs(text: str | None) -> dict | None:
    """``--network-kwargs``: a JSON object of JSON objects, one per network name."""
    import json

    from medmamba.errors import UsageError

    if text is None:
        return None
    example = 'give e.g. \'{"segmamba": {"ssm_fp32": false}}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--network-kwargs: not JSON ({err}); {example}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UsageError(f"--network-kwargs: expected an object of objects, one per network; {example}")
    return value
