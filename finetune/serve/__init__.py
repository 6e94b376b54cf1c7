"""``finetune serve``: a trained model over HTTP (FastAPI on uvicorn, one process): the runtime
(:mod:`.runtime`: ONNX Runtime or PyTorch), dynamic batching (:mod:`.batching`), input limits
(:mod:`.guards`), the routes (:mod:`.app`) and the demo page (``page.html``)."""
