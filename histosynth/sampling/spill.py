"""Canvas-sized tensors kept in a file between the moments a step reads them.

A healed canvas step needs four canvases (the latents, the merged model output, the solver's history and the
previous step's x0), but only the first two all the time: the history is read once per step by the solver and the
previous x0 once by the heal, a band of rows at a time. Kept on disk in between, they leave two canvases in memory,
which at 32768² px is the difference between fitting in 8 GB and not (README, "Where a run peaks, measured").
The values go to a plain file and come back by explicit reads (not a memory map, whose pages would count as the
process's memory while they are cached), so what comes back is the same bits. Hand-written: no library spills part of
a diffusers scheduler's state.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import torch

from histosynth.errors import HistosynthError


def _bytes(plane: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable in place (numpy has no bfloat16: viewed as bytes first)."""
    array = plane.view(torch.uint8).numpy() if plane.dtype == torch.bfloat16 else plane.numpy()
    return memoryview(array).cast("B")


class SpilledCanvas:
    """A (1, C, H, W) tensor held as its raw values in a file, read and written by rows or by slabs.

    The file is removed when the object is garbage-collected, so a spilled entry the solver lets go frees its disk
    space as a tensor would free its memory."""

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str):
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError(f"a spilled canvas is (1, C, H, W), got {tuple(shape)}")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        handle, name = tempfile.mkstemp(dir=folder, prefix="canvas-", suffix=".raw")
        self.path = Path(name)
        self._fd = handle
        os.ftruncate(handle, self.shape.numel() * self._itemsize)
        self._finalizer = weakref.finalize(self, _remove, handle, name)

    @classmethod
    def of(cls, tensor: torch.Tensor, folder: Path) -> SpilledCanvas:
        """``tensor`` written to a new file in ``folder``."""
        spilled = cls(folder, tuple(tensor.shape), tensor.dtype, tensor.device)
        spilled.write_rows(0, tensor)
        return spilled

    def _offset(self, channel: int, row: int) -> int:
        _, _, height, width = self.shape
        return ((channel * height) + row) * width * self._itemsize

    def _read(self, channel: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """One channel's rows ``start`` … ``stop`` − 1, (stop − start, W), read into ``out`` where given."""
        width = self.shape[3]
        values = torch.empty((stop - start, width), dtype=self.dtype) if out is None else out
        if values.numel() == 0:
            return values
        buffer = _bytes(values)
        done, offset = 0, self._offset(channel, start)
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: spilled canvas ends early")
            done += got
        return values

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start`` … ``stop`` − 1 of every channel, (1, C, stop − start, W), on the canvas's device; read
        straight into the result, so reading the whole canvas holds one canvas, not two."""
        _, channels, _, width = self.shape
        rows = torch.empty((1, channels, stop - start, width), dtype=self.dtype)
        for c in range(channels):
            self._read(c, start, stop, out=rows[0, c])
        return rows.to(self.device)

    def read_slab(self, channel: int, rows: slice) -> torch.Tensor:
        """One channel's rows (``slabs``' unit), (1, 1, n, W): one contiguous read."""
        return self._read(channel, rows.start, rows.stop)[None, None].to(self.device)

    def write_rows(self, start: int, values: torch.Tensor) -> None:
        """``values`` (1, C, n, W) written over rows ``start`` … ``start`` + n − 1."""
        values = values.detach().to("cpu", self.dtype)
        if values.numel() == 0:
            return
        for c in range(self.shape[1]):
            buffer = _bytes(values[0, c].contiguous())
            done, offset = 0, self._offset(c, start)
            while done < len(buffer):
                try:
                    done += os.pwritev(self._fd, [buffer[done:]], offset + done)
                except OSError as error:
                    raise HistosynthError(f"{self.path.parent}: cannot keep a canvas on disk there "
                                          f"({error.strerror}); free some space or choose another --out") from None

    def load(self) -> torch.Tensor:
        """The whole tensor."""
        return self.read_rows(0, self.shape[2])


def _remove(handle: int, name: str) -> None:
    os.close(handle)
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def rows_of(canvas: torch.Tensor | SpilledCanvas, start: int, stop: int) -> torch.Tensor:
    """Rows ``start`` … ``stop`` − 1 of a canvas in memory or on disk."""
    if isinstance(canvas, SpilledCanvas):
        return canvas.read_rows(start, stop)
    return canvas[:, :, start:stop]


def slab_of(canvas: torch.Tensor | SpilledCanvas, channel: int, rows: slice) -> torch.Tensor:
    """One channel's ``rows`` of a canvas in memory or on disk (a view where it is in memory)."""
    if isinstance(canvas, SpilledCanvas):
        return canvas.read_slab(channel, rows)
    return canvas[:, channel:channel + 1, rows]


def write_rows(canvas: torch.Tensor | SpilledCanvas, start: int, values: torch.Tensor) -> None:
    """``values`` over rows ``start`` … of a canvas in memory or on disk."""
    if isinstance(canvas, SpilledCanvas):
        canvas.write_rows(start, values)
    else:
        canvas[:, :, start:start + values.shape[2]] = values


def in_memory(canvas: torch.Tensor | SpilledCanvas | None) -> torch.Tensor | None:
    """The canvas as a tensor (read whole from disk where it was spilled)."""
    return canvas.load() if isinstance(canvas, SpilledCanvas) else canvas


class Spill:
    """Where a run keeps its canvas-sized tensors between reads: a folder, for canvases of ``min_elements`` or
    more (smaller ones stay in memory, where they cost less than the file operations)."""

    def __init__(self, folder: Path, min_elements: int = 0):
        self.folder = Path(folder)
        self.min_elements = min_elements

    def wanted(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and shape[0] == 1 and torch.Size(shape).numel() >= self.min_elements

    def keep(self, tensor: torch.Tensor) -> torch.Tensor | SpilledCanvas:
        """``tensor`` spilled to the folder where it is large enough, else itself."""
        if isinstance(tensor, SpilledCanvas) or not self.wanted(tuple(tensor.shape)):
            return tensor
        return SpilledCanvas.of(tensor, self.folder)

    def new(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | SpilledCanvas:
        """An empty canvas of ``shape`` with ``like``'s dtype and device: a file where it is large enough."""
        if self.wanted(tuple(shape)):
            return SpilledCanvas(self.folder, tuple(shape), like.dtype, like.device)
        return torch.empty(shape, dtype=like.dtype, device=like.device)
