"""Dynamic batching: images of concurrent requests share one forward pass.

Hand-written because the server is one process with one event loop: LitServe and Triton batch
across worker processes (a queue and a copy per image), and a forward pass on a 2-core machine
gains nothing from a second process. Here a request awaits its images' rows; one task takes what
is queued, up to ``max_batch_size`` images, waiting at most ``max_wait_s`` for more once the
first has arrived, and runs the batch in a worker thread (ONNX Runtime and PyTorch release the
GIL), so decoding of the next requests goes on meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np


class Overloaded(Exception):
    """More images are waiting than ``max_pending``: the caller should retry later."""


class DynamicBatcher:
    """``await batcher.predict(inputs)`` -> the rows of ``forward(np.stack(...))`` for `inputs`.

    `forward` maps an (N, ...) float32 batch to (N, C); it runs in one thread at a time, in
    arrival order. Start with :meth:`start` inside the event loop; :meth:`stop` cancels it.
    """

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_pending: int = 256,
    ):
        self.forward, self.max_batch_size, self.max_wait_s, self.max_pending = (
            forward,
            max_batch_size,
            max_wait_s,
            max_pending,
        )
        self.batches = self.images = 0  # what has been served: mean batch size = images / batches
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        if self.pending + len(inputs) > self.max_pending:
            raise Overloaded(f"{self.pending} images are waiting (max_pending={self.max_pending})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        for item, future in zip(inputs, futures):
            self._queue.put_nowait((item, future))
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Polling, not wait_for(queue.get()): a get cancelled at its timeout can drop an item (Python < 3.12).
                await asyncio.sleep(min(remaining, 0.001))
            live = [(item, future) for item, future in batch if not future.done()]  # a client may have gone
            if not live:
                continue
            try:
                rows = await asyncio.to_thread(self.forward, np.stack([item for item, _ in live]))
            except Exception as err:  # noqa: BLE001 - every waiting request gets the failure, the loop goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(live)
            for row, (_, future) in zip(rows, live):
                if not future.done():
                    future.set_result(row)
