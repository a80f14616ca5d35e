"""Exporting a model file to other runtimes: `onnx` (the decoder graph, ONNX Runtime or any ONNX
runtime), `codes` (plane matrices as ONNX integer codes), `graph` (the small graph builder),
`runtime` (running the export in ONNX Runtime).  `onnx` and `onnxruntime` are the optional extra
`edgepanel[onnx]`, imported only when used."""
