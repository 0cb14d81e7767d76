"""Memory the kernel reads or writes: pinned Python buffers and provided-buffer rings.

Handing a buffer to the kernel
------------------------------
An SQE carries a raw address. Between the submission and the completion the
kernel may read (send) or write (recv) that memory at any moment, from this
thread or from an io-wq worker, so the Python object behind the address must
neither be freed nor moved. `pin` turns a buffer into ``(address, keepalive)``;
whoever queues the SQE holds ``keepalive`` until the operation's last CQE
(``Ring`` does this for every operation it prepares).

* ``bytes`` are immutable and their data lives inside the object, so keeping
  the object alive is enough. Their address is read off the object's layout
  (checked against ctypes when this module is imported; where the check fails
  the slower ctypes path is used).
* Writable buffers (``bytearray``, ``memoryview`` of one, ``mmap``, ``array``)
  are pinned by a buffer export: ``ctypes.c_char.from_buffer``. While the export
  lives, ``bytearray`` refuses to resize (``BufferError``) and ``mmap`` refuses
  to close, so the kernel can never be left writing into freed memory.
* Any other read-only buffer is copied to ``bytes`` first, and refused where
  the kernel is to write into it (recv, read): it would write into the copy, or
  into an immutable object.
* `Pinned` does this once for a buffer used again and again (a transport's
  receive buffer); operations on it then allocate nothing.

Provided-buffer rings (kernel 5.19, ``IORING_REGISTER_PBUF_RING``)
------------------------------------------------------------------
For multishot recv the kernel picks the buffer at the moment data arrives, from
a group the application registered. `ProvidedBuffers` owns two mappings:

* the *arena*: ``count`` buffers of ``size`` bytes, buffer ``i`` at
  ``arena + i * size``;
* the *buffer ring*: ``count`` 16-byte entries ``{u64 addr, u32 len, u16 bid,
  u16 resv}``, page aligned. The ``resv`` field of entry 0 doubles as the ring's
  16-bit tail. The kernel keeps the head to itself.

Who owns buffer ``bid``:

1. the kernel, from the moment its entry is published (the tail store) until a
   CQE names it (``IORING_CQE_F_BUFFER`` set, id in ``flags >> 16``);
2. the application, from that CQE until it calls ``recycle(bid)``, which
   writes the entry at the tail and publishes it again.

There are exactly ``count`` buffers and ``count`` ring slots, and a buffer is in
the ring at most once (``recycle`` refuses a buffer that is not lent out), so
the ring can never overflow. When every buffer is lent out the kernel ends a
multishot recv with ``-ENOBUFS`` (no ``IORING_CQE_F_MORE``): the caller hands
buffers back and arms the recv again. A CQE with ``IORING_CQE_F_BUFFER`` must be
recycled whatever its ``res`` says.

The entry is written before the tail. The kernel reads the tail with acquire
semantics; on x86-64 two stores are never reordered, and see ``ring.py`` for
why other machines are covered too.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, final

from . import abi

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof
_pack_entry = abi.BUF_ENTRY.pack_into
_BUFFER_SHIFT = abi.CQE_BUFFER_SHIFT
_F_BUFFER = abi.CQE_F_BUFFER


def _bytes_data_offset() -> int | None:
    """Offset of a ``bytes`` object's data from ``id()``, if this interpreter lays it out so."""
    offset = getattr(bytes, "__basicsize__", 0) - 1
    sample = b"forkloop checks the bytes layout"
    # ctypes.cast takes bytes (as a char pointer), which typeshed does not list.
    address = ctypes.cast(sample, ctypes.c_void_p).value  # type: ignore[arg-type]
    if offset > 0 and id(sample) + offset == address:
        return offset
    return None


_BYTES_DATA_OFFSET = _bytes_data_offset()


def pin(buffer: ReadableBuffer) -> tuple[int, object]:
    """The address of ``buffer``'s first byte and the object to hold while the kernel uses it."""
    if type(buffer) is bytes and _BYTES_DATA_OFFSET is not None:
        return id(buffer) + _BYTES_DATA_OFFSET, buffer
    try:
        export = _from_buffer(buffer)
    except TypeError:
        # Read-only and not bytes: a memoryview of bytes, for instance.
        copy = bytes(buffer)
        return pin(copy) if copy else (0, copy)
    except ValueError:
        # from_buffer refuses an empty buffer; there is nothing for the kernel to touch.
        return 0, buffer
    return _addressof(export), export


@final  # so that ``type(buffer) is Pinned`` tells mypy what buffer is not, too
class Pinned:
    """A buffer pinned once for many operations: no allocation and no ctypes call per operation.

    A transport that receives into the same buffer again and again wraps it
    once and passes the wrapper to ``prepare_recv``. While the wrapper lives a
    ``bytearray`` behind it cannot be resized.
    """

    __slots__ = ("_keep", "address", "buffer", "size", "writable")

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        if type(buffer) is bytes:
            self.address, self._keep = pin(buffer)
            self.writable = False
        else:
            try:
                self._keep = _from_buffer(buffer)
            except TypeError:
                raise TypeError("only bytes or a writable buffer can be pinned for reuse") from None
            self.address = _addressof(self._keep)
            self.writable = True
        self.buffer = buffer
        self.size = len(buffer)

    def __len__(self) -> int:
        return self.size


# What an operation may point the kernel at: a buffer (bytes, bytearray, memoryview,
# mmap, array), or a Pinned one; the kernel writes into the second kind.
OutgoingBuffer: TypeAlias = "ReadableBuffer | Pinned"
IncomingBuffer: TypeAlias = "WriteableBuffer | Pinned"


def pin_span(
    buffer: OutgoingBuffer, offset: int, length: int | None, writable: bool = False
) -> tuple[int, int, object]:
    """`pin` for ``buffer[offset:offset + length]``: its address, its length and the keepalive.

    Refuses a span that leaves the buffer, since the kernel would read or write
    past its end, and a read-only buffer when the kernel is to write
    (``writable``). ``length=None`` means up to the end.
    """
    # Every buffer the engine is given has a length; typeshed's Buffer does not say so.
    size = len(buffer)  # type: ignore[arg-type]
    if length is None:
        length = size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"span [{offset}:{offset}+{length}] is outside a buffer of {size} bytes")
    if type(buffer) is Pinned:
        if writable and not buffer.writable:
            raise TypeError("the kernel would write into a pinned bytes object")
        return buffer.address + offset, length, buffer
    kind = type(buffer)
    if kind is bytes and not writable and _BYTES_DATA_OFFSET is not None:
        return id(buffer) + _BYTES_DATA_OFFSET + offset, length, buffer
    try:
        export = _from_buffer(buffer)
    except (TypeError, ValueError):
        if writable and size:
            raise TypeError(
                f"the kernel writes into this buffer; {kind.__name__} is read-only"
            ) from None
        address, keep = pin(buffer)
        return address + offset, length, keep
    return _addressof(export) + offset, length, export


def address_of_mapping(mapping: mmap.mmap) -> int:
    """The address of an mmap, without keeping a buffer export on it."""
    export = _from_buffer(mapping)
    address = _addressof(export)
    del export
    return address


Register = Callable[[int, int, int], int]


class ProvidedBuffers:
    """A provided-buffer ring: ``count`` buffers of ``size`` bytes in buffer group ``group_id``.

    Made by `Ring.provide_buffers`, which registers it and unregisters it when
    the ring closes.
    """

    def __init__(self, register: Register, group_id: int, count: int, size: int) -> None:
        if count < 1 or count > 32768 or count & (count - 1):
            raise ValueError(f"a buffer ring holds a power of two of 1..32768 buffers, not {count}")
        if not 0 < size < 1 << 32:
            raise ValueError(f"buffer size must be between 1 byte and 4 GiB, not {size}")
        if not 0 <= group_id < 1 << 16:
            raise ValueError(f"buffer group ids are 16-bit, {group_id} is not")
        self.group_id = group_id
        self.count = count
        self.size = size
        self._register = register
        self._mask = count - 1
        # Anonymous mappings are page aligned, as the kernel requires of the ring.
        self._ring_memory = mmap.mmap(-1, max(mmap.PAGESIZE, count * abi.BUF_ENTRY_SIZE))
        self._arena = mmap.mmap(-1, count * size)
        self._entries = memoryview(self._ring_memory)
        self._tail_word = self._entries[
            abi.BUF_RING_TAIL_OFFSET : abi.BUF_RING_TAIL_OFFSET + 2
        ].cast("H")
        self._arena_view = memoryview(self._arena)
        self._arena_address = address_of_mapping(self._arena)
        self._lent = bytearray(count)  # 1 while the application holds the buffer
        self._slot_buffer = [-1] * count  # which buffer's entry each ring slot holds now
        self._in_id_order = True  # slot i holds buffer i, as bundles need (see _write_entry)
        self._lent_count = 0
        # consume() gives a buffer back by moving the tail alone for a completion of at
        # most this many bytes: one buffer's size while none is lent, else none (-1).
        self._consumed_in_place_up_to = size
        self._tail = 0
        for buffer_id in range(count):
            self._publish(buffer_id)
        self._registration = bytearray(abi.BUF_REG.size)
        abi.BUF_REG.pack_into(
            self._registration,
            0,
            address_of_mapping(self._ring_memory),
            count,
            group_id,
            0,
            0,
            0,
            0,
        )
        address, self._registration_pin = pin(self._registration)
        register(abi.REGISTER_PBUF_RING, address, 1)
        self._registered = True

    @property
    def lent(self) -> int:
        """How many buffers the application holds (taken and not yet recycled)."""
        return self._lent_count

    def take(self, cqe_flags: int, length: int) -> tuple[int, memoryview]:
        """Claim the buffer a CQE names; return its id and a view of its first ``length`` bytes.

        The view aliases the arena: copy what you need, release the view, then
        `recycle` the id.
        """
        buffer_id = self._claim(cqe_flags)
        self._lent[buffer_id] = 1
        self._lent_count += 1
        self._consumed_in_place_up_to = -1
        start = buffer_id * self.size
        return buffer_id, self._arena_view[start : start + length]

    def consume(self, cqe_flags: int, length: int) -> bytes:
        """Copy the data a CQE delivered into ``bytes`` and give the buffer straight back.

        The loop calls this once per received chunk, so it trusts the CQE (the
        loop passes only completions that carry a buffer) and gives the buffer
        back by moving the tail alone: the kernel takes buffers in ring order,
        and while no buffer is lent (`take`) the slot at the tail is the very
        slot this buffer was taken from, which still holds its entry (see
        `_write_entry` for when entries must be rewritten).
        """
        if length > self._consumed_in_place_up_to:
            return self._consume_bundle_or_lent(cqe_flags, length)
        start = (cqe_flags >> _BUFFER_SHIFT) * self.size
        self._tail = tail = (self._tail + 1) & 0xFFFF
        self._tail_word[0] = tail  # the release store: the entry is in place already
        return self._arena[start : start + length]

    def _consume_bundle_or_lent(self, cqe_flags: int, length: int) -> bytes:
        if self._lent_count or not self._in_id_order:
            if length > self.size:
                raise RuntimeError(
                    "a bundle of buffers arrived while the ring holds them out of id order; "
                    "take() and recycle() do not mix with bundles"
                )
            return self._consume_while_lent(cqe_flags, length)
        # A bundle: the buffers after the one named are the next ones in ring order,
        # which while nothing is lent are the next buffer ids, so the bytes lie one after
        # another in the arena (in two pieces if they run past its end).
        start = (cqe_flags >> _BUFFER_SHIFT) * self.size
        end = start + length
        arena_size = self.count * self.size
        if end <= arena_size:
            data = self._arena[start:end]
        else:
            data = self._arena[start:arena_size] + self._arena[: end - arena_size]
        self._tail = tail = (self._tail - (-length // self.size)) & 0xFFFF  # ceil(length/size)
        self._tail_word[0] = tail
        return data

    def _consume_while_lent(self, cqe_flags: int, length: int) -> bytes:
        """`consume` while the application holds buffers: publish this one's entry now."""
        buffer_id = cqe_flags >> _BUFFER_SHIFT
        if not cqe_flags & _F_BUFFER or buffer_id >= self.count or self._lent[buffer_id]:
            self._claim(cqe_flags)  # raises, saying what is wrong
        start = buffer_id * self.size
        data = self._arena[start : start + length]
        self._publish(buffer_id)
        return data

    def _claim(self, cqe_flags: int) -> int:
        if not cqe_flags & abi.CQE_F_BUFFER:
            raise ValueError("this completion carries no provided buffer")
        buffer_id = cqe_flags >> abi.CQE_BUFFER_SHIFT
        if buffer_id >= self.count or self._lent[buffer_id]:
            raise RuntimeError(
                f"the kernel delivered buffer {buffer_id} of group {self.group_id}, which the "
                "application holds; a buffer was recycled twice or the group id is wrong"
            )
        return buffer_id

    def recycle(self, buffer_id: int) -> None:
        """Give buffer ``buffer_id`` back to the kernel."""
        if not self._lent[buffer_id]:
            raise ValueError(
                f"buffer {buffer_id} of group {self.group_id} is not lent out; recycling it "
                "would put one buffer in the ring twice"
            )
        self._lent[buffer_id] = 0
        self._lent_count -= 1
        if not self._lent_count:
            self._consumed_in_place_up_to = self.size
        self._publish(buffer_id)

    def _publish(self, buffer_id: int) -> None:
        tail = self._tail
        slot = tail & self._mask
        if self._slot_buffer[slot] != buffer_id:
            self._write_entry(slot, buffer_id)
        tail = (tail + 1) & 0xFFFF
        self._tail = tail
        self._tail_word[0] = tail  # the release store: the entry is written first

    def _write_entry(self, slot: int, buffer_id: int) -> None:
        """Point ring slot ``slot`` at buffer ``buffer_id``.

        The kernel reads entries and never writes them, and it takes buffers in
        ring order. A buffer given back in the order it was taken therefore
        lands in the very slot it was taken from, which still holds its entry:
        only the tail moves. The entry is written only when the order differs.
        """
        _pack_entry(
            self._entries,
            slot * abi.BUF_ENTRY_SIZE,
            self._arena_address + buffer_id * self.size,
            self.size,
            buffer_id,
        )
        self._slot_buffer[slot] = buffer_id
        if slot != buffer_id:
            self._in_id_order = False

    def close(self) -> None:
        """Unregister the group, then free its memory (views still held keep the arena alive)."""
        if not self._registered:
            return
        self._registered = False
        registration = bytearray(abi.BUF_REG.size)
        abi.BUF_REG.pack_into(registration, 0, 0, 0, self.group_id, 0, 0, 0, 0)
        address, keep = pin(registration)
        try:
            self._register(abi.UNREGISTER_PBUF_RING, address, 1)
        except OSError:
            pass  # the ring is gone already, and the registration with it
        del keep
        self._tail_word.release()
        self._entries.release()
        self._ring_memory.close()
        self._arena_view.release()
        try:
            self._arena.close()
        except BufferError:
            pass  # a caller still holds a view from take(); the mapping goes with it
