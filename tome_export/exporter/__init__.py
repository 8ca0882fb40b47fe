"""The PyTorch → ONNX side: loading models, inserting merges, exporting them to ONNX.

``load`` resolves a MODEL argument, ``tracer`` and ``insert`` rewrite foreign or missing
merges in a torch.export graph, ``onnx_export`` runs torch.onnx with the merge op translated
by one of the lowerings (``lowerings`` and the ``*_lowering`` modules), ``aten_fixes``
corrects stock translations.
"""
