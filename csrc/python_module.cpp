// The Python module soap_kernels._C: empty on purpose. Importing it loads this shared library,
// whose static initialisers register the soap_kernels ops with torch's dispatcher; Python reaches
// them as torch.ops.soap_kernels.*. No pybind11 and no Python API beyond module creation, so the
// ops themselves never depend on Python (the CMake build leaves this file empty).
#ifdef SOAP_KERNELS_PYTHON_MODULE
#include <Python.h>

namespace {
PyModuleDef soap_kernels_c_module = {
    PyModuleDef_HEAD_INIT,
    "soap_kernels._C",
    "Native kernels of soap_kernels; the ops are torch.ops.soap_kernels.*",
    -1,
    nullptr,
};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&soap_kernels_c_module);
}
#endif  // SOAP_KERNELS_PYTHON_MODULE
