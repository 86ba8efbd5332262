// int4train PyTorch binding: the Python extension module int4train._C. It holds no functions:
// importing it loads this library, whose static TORCH_LIBRARY registrations define the
// torch.ops.int4train.* operators (Python adds only fake kernels and wrappers). Its one attribute,
// DENSE_FALLBACK_MACS, is linear.h's kDenseFallbackMacs (the small-shape rule), so that Python
// reads the constant instead of copying it.
#include <Python.h>

#include "int4train/linear.h"

namespace {

PyModuleDef int4train_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "int4train C++ extension: importing it registers the torch.ops.int4train operators.",
    -1,       // m_size: no per-module state
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&int4train_module);
  if (m == nullptr) return nullptr;
  PyObject* macs = PyFloat_FromDouble(int4train::kDenseFallbackMacs);
  if (macs == nullptr || PyModule_AddObject(m, "DENSE_FALLBACK_MACS", macs) != 0) {
    Py_XDECREF(macs);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
