"""``mtlvision serve``: a trained multi-task model behind an HTTP service, with dynamic batching and a page.

- :mod:`~mtlvision.serving.settings`: the service's options and limits, validated.
- :mod:`~mtlvision.serving.backends`: PyTorch or the exported ONNX graph through onnxruntime.
- :mod:`~mtlvision.serving.batcher`: concurrent requests gathered into one forward pass.
- :mod:`~mtlvision.serving.uploads`: an upload checked and decoded, or refused with a 4xx naming the problem.
- :mod:`~mtlvision.serving.encode`: every task's result as JSON (class maps as PNG or RLE, float maps as PNG
  or raw float32).
- :mod:`~mtlvision.serving.service`: the run loaded, predictions at each image's own size.
- :mod:`~mtlvision.serving.app`: the FastAPI application (``/predict``, ``/model``, ``/health``, the page).

FastAPI, uvicorn and python-multipart come with the ``serve`` extra (``pip install 'mtlvision[serve]'``);
nothing here is imported by ``import mtlvision`` or by the other verbs.
"""
