/* A lean C launcher for the scan's compiled Triton kernels (see native.py for why and when it is used).
 *
 * launch(function, gx, gy, gz, threads, shared, stream, device, kinds, args) packs `args` as the kernel's
 * parameters, one per byte of `kinds`, and launches with cuLaunchKernel on `stream`:
 *   'x' a compile-time argument: not a parameter, skipped;
 *   'p' a pointer: a tensor (its data_ptr()), an int (the address itself) or None (null);
 *   'i' a 32-bit int, 'l' a 64-bit int, 'f' a 32-bit float.
 * Two null pointers follow the arguments: the global and profile scratch parameters that Triton appends to every
 * kernel (native.py only takes kernels that need no scratch). pack(kinds, args) returns the parameters' bytes,
 * 8 per parameter, instead of launching: what the CPU tests compare.
 *
 * Triton's own launcher asks the driver for each pointer's attributes (cuPointerGetAttribute), to refuse host
 * memory with a clear error; the scan's call sites pass CUDA tensors they allocated or checked, so this one does
 * not, which is most of the host time it saves. The driver is opened with dlopen: the module builds on machines
 * without CUDA, and there launch() raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUfunction;
typedef void *CUstream;

typedef CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                 CUstream, void **, void **);
typedef CUresult (*CtxGetCurrent)(CUcontext *);
typedef CUresult (*CtxSetCurrent)(CUcontext);
typedef CUresult (*DeviceGet)(CUdevice *, int);
typedef CUresult (*PrimaryCtxRetain)(CUcontext *, CUdevice);
typedef CUresult (*GetErrorString)(CUresult, const char **);

#define MAX_PARAMS 254

static LaunchKernel launch_kernel = NULL;
static CtxGetCurrent ctx_get_current = NULL;
static CtxSetCurrent ctx_set_current = NULL;
static DeviceGet device_get = NULL;
static PrimaryCtxRetain primary_ctx_retain = NULL;
static GetErrorString get_error_string = NULL;
static PyObject *data_ptr_name = NULL;

static int open_driver(void) {
  if (launch_kernel != NULL) return 1;
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (lib == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "the CUDA driver (libcuda.so.1) could not be opened");
    return 0;
  }
  ctx_get_current = (CtxGetCurrent)dlsym(lib, "cuCtxGetCurrent");
  ctx_set_current = (CtxSetCurrent)dlsym(lib, "cuCtxSetCurrent");
  device_get = (DeviceGet)dlsym(lib, "cuDeviceGet");
  primary_ctx_retain = (PrimaryCtxRetain)dlsym(lib, "cuDevicePrimaryCtxRetain");
  get_error_string = (GetErrorString)dlsym(lib, "cuGetErrorString");
  LaunchKernel found = (LaunchKernel)dlsym(lib, "cuLaunchKernel");
  if (!found || !ctx_get_current || !ctx_set_current || !device_get || !primary_ctx_retain) {
    PyErr_SetString(PyExc_RuntimeError, "the CUDA driver lacks cuLaunchKernel or the context calls");
    return 0;
  }
  launch_kernel = found;
  return 1;
}

static int cuda_error(CUresult status, const char *what) {
  const char *text = NULL;
  if (get_error_string != NULL) get_error_string(status, &text);
  PyErr_Format(PyExc_RuntimeError, "%s failed: CUDA error %d (%s)", what, status, text ? text : "unknown");
  return 0;
}

/* The device's primary context current on this thread, as Triton's launcher makes it (autograd's worker threads
 * may have none yet). */
static int current_context(int device) {
  CUcontext ctx = NULL;
  CUresult status = ctx_get_current(&ctx);
  if (status != 0) return cuda_error(status, "cuCtxGetCurrent");
  if (ctx != NULL) return 1;
  CUdevice dev;
  status = device_get(&dev, device);
  if (status != 0) return cuda_error(status, "cuDeviceGet");
  status = primary_ctx_retain(&ctx, dev);
  if (status != 0) return cuda_error(status, "cuDevicePrimaryCtxRetain");
  status = ctx_set_current(ctx);
  if (status != 0) return cuda_error(status, "cuCtxSetCurrent");
  return 1;
}

static int pointer_of(PyObject *obj, uint64_t *out) {
  if (obj == Py_None) {
    *out = 0;
    return 1;
  }
  if (PyLong_Check(obj)) {
    *out = PyLong_AsUnsignedLongLong(obj);
    return !PyErr_Occurred();
  }
  PyObject *ret = PyObject_CallMethodObjArgs(obj, data_ptr_name, NULL);
  if (ret == NULL) return 0;
  *out = PyLong_AsUnsignedLongLong(ret);
  Py_DECREF(ret);
  return !PyErr_Occurred();
}

/* Packs `args` by `kinds` into slots (8 bytes each) and params (a pointer to each slot); returns the number of
 * parameters, the two scratch pointers included, or -1 with an exception set. */
static int pack_params(const char *kinds, Py_ssize_t n_kinds, PyObject *args, uint64_t *slots, void **params) {
  if (!PyTuple_Check(args)) {
    PyErr_SetString(PyExc_TypeError, "args must be a tuple");
    return -1;
  }
  if (PyTuple_GET_SIZE(args) != n_kinds) {
    PyErr_Format(PyExc_ValueError, "%zd arguments for %zd kinds", PyTuple_GET_SIZE(args), n_kinds);
    return -1;
  }
  int n = 0;
  for (Py_ssize_t i = 0; i < n_kinds; ++i) {
    char kind = kinds[i];
    if (kind == 'x') continue;
    if (n >= MAX_PARAMS) {
      PyErr_SetString(PyExc_ValueError, "too many kernel parameters");
      return -1;
    }
    PyObject *arg = PyTuple_GET_ITEM(args, i);
    uint64_t *slot = &slots[n];
    *slot = 0;
    switch (kind) {
    case 'p':
      if (!pointer_of(arg, slot)) return -1;
      break;
    case 'i': {
      long v = PyLong_AsLong(arg);
      if (v == -1 && PyErr_Occurred()) return -1;
      if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "argument %zd does not fit a 32-bit parameter", i);
        return -1;
      }
      *(int32_t *)slot = (int32_t)v;
      break;
    }
    case 'l': {
      long long v = PyLong_AsLongLong(arg);
      if (v == -1 && PyErr_Occurred()) return -1;
      *(int64_t *)slot = (int64_t)v;
      break;
    }
    case 'f': {
      double v = PyFloat_AsDouble(arg);
      if (v == -1.0 && PyErr_Occurred()) return -1;
      *(float *)slot = (float)v;
      break;
    }
    default:
      PyErr_Format(PyExc_ValueError, "unknown parameter kind %c", kind);
      return -1;
    }
    params[n] = slot;
    ++n;
  }
  slots[n] = 0; /* global scratch */
  params[n] = &slots[n];
  ++n;
  slots[n] = 0; /* profile scratch */
  params[n] = &slots[n];
  ++n;
  return n;
}

static PyObject *launch(PyObject *self, PyObject *args) {
  unsigned long long function, stream;
  unsigned int gx, gy, gz, threads, shared;
  int device;
  const char *kinds;
  Py_ssize_t n_kinds;
  PyObject *kernel_args;
  if (!PyArg_ParseTuple(args, "KIIIIIKiy#O", &function, &gx, &gy, &gz, &threads, &shared, &stream, &device, &kinds,
                        &n_kinds, &kernel_args))
    return NULL;
  uint64_t slots[MAX_PARAMS + 2];
  void *params[MAX_PARAMS + 2];
  if (pack_params(kinds, n_kinds, kernel_args, slots, params) < 0) return NULL;
  if ((unsigned long long)gx * gy * gz == 0) Py_RETURN_NONE;
  if (!open_driver() || !current_context(device)) return NULL;
  CUresult status;
  Py_BEGIN_ALLOW_THREADS;
  status = launch_kernel((CUfunction)function, gx, gy, gz, threads, 1, 1, shared, (CUstream)stream, params, NULL);
  Py_END_ALLOW_THREADS;
  if (status != 0) {
    cuda_error(status, "cuLaunchKernel");
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *pack(PyObject *self, PyObject *args) {
  const char *kinds;
  Py_ssize_t n_kinds;
  PyObject *kernel_args;
  if (!PyArg_ParseTuple(args, "y#O", &kinds, &n_kinds, &kernel_args)) return NULL;
  uint64_t slots[MAX_PARAMS + 2];
  void *params[MAX_PARAMS + 2];
  int n = pack_params(kinds, n_kinds, kernel_args, slots, params);
  if (n < 0) return NULL;
  return PyBytes_FromStringAndSize((const char *)slots, (Py_ssize_t)n * 8);
}

static PyMethodDef methods[] = {
    {"launch", launch, METH_VARARGS, "launch(function, gx, gy, gz, threads, shared, stream, device, kinds, args)"},
    {"pack", pack, METH_VARARGS, "pack(kinds, args) -> the parameters' bytes, 8 per parameter"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "medmamba_native_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit_medmamba_native_launch(void) {
  data_ptr_name = PyUnicode_InternFromString("data_ptr");
  if (data_ptr_name == NULL) return NULL;
  return PyModule_Create(&module);
}
