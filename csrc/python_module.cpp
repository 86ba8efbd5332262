// int4train PyTorch binding: the Python extension module int4train._C. It holds no functions:
// importing it loads this library, whose static TORCH_LIBRARY registrations define the
// torch.ops.int4train.* operators (Python adds only fake kernels and wrappers). Its one attribute,
// DENSE_FALLBACK_MACS, is linear.h's dense_fallback_macs (the small-shape rule's threshold) of each
// recipe as a dict {name: multiply-adds}, so that Python reads the constants instead of copying
// them.
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
  PyObject* macs = PyDict_New();
  bool ok = macs != nullptr;
  for (int r = 0; ok && r < int4train::kNumRecipes; ++r) {
    const auto recipe = static_cast<int4train::Recipe>(r);
    PyObject* value = PyFloat_FromDouble(int4train::dense_fallback_macs(recipe));
    ok = value != nullptr && PyDict_SetItemString(macs, int4train::recipe_name(recipe), value) == 0;
    Py_XDECREF(value);
  }
  if (!ok || PyModule_AddObject(m, "DENSE_FALLBACK_MACS", macs) != 0) {
    Py_XDECREF(macs);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
