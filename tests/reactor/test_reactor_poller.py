"""The pollers, epoll and the selectors fallback, held to one contract."""

from __future__ import annotations

import selectors
import socket

import pytest

from forkloop.reactor.poller import EpollPoller, SelectorPoller, new_poller


@pytest.fixture(params=["epoll", "selectors"])
def poller(request):
    errors = []

    def report(exc, fd, callback):
        errors.append((exc, fd))

    made = (
        EpollPoller(report)
        if request.param == "epoll"
        else SelectorPoller(report, selectors.PollSelector)
    )
    made.errors = errors
    yield made
    made.close()


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    yield left, right
    left.close()
    right.close()


def test_reader_is_called_while_data_waits_and_not_after_clear(poller, pair):
    left, right = pair
    calls = []
    poller.set_reader(left.fileno(), lambda: calls.append("read"))
    poller.poll(0)
    assert calls == []
    right.send(b"x")
    poller.poll(1)
    poller.poll(1)  # level-triggered: still readable
    assert calls == ["read", "read"]
    assert poller.clear_reader(left.fileno())
    poller.poll(0)
    assert calls == ["read", "read"]
    assert not poller.clear_reader(left.fileno())


def test_reader_and_writer_on_one_fd_are_independent(poller, pair):
    left, right = pair
    calls = []
    poller.set_writer(left.fileno(), lambda: calls.append("write"))
    poller.set_reader(left.fileno(), lambda: calls.append("read"))
    right.send(b"x")
    poller.poll(1)
    assert sorted(calls) == ["read", "write"]
    poller.clear_writer(left.fileno())
    calls.clear()
    poller.poll(1)
    assert calls == ["read"]


def test_clear_with_a_callback_only_removes_that_callback(poller, pair):
    left, _ = pair

    def mine():
        pass

    def theirs():
        pass

    poller.set_reader(left.fileno(), theirs)
    assert not poller.clear_reader(left.fileno(), mine)
    assert poller.reader_of(left.fileno()) is theirs
    assert poller.clear_reader(left.fileno(), theirs)


def test_a_failing_callback_is_reported_and_the_batch_goes_on(poller, pair):
    left, right = pair
    other_left, other_right = socket.socketpair()
    calls = []

    def broken():
        raise ValueError("callback bug")

    poller.set_reader(left.fileno(), broken)
    poller.set_reader(other_left.fileno(), lambda: calls.append("other"))
    right.send(b"x")
    other_right.send(b"y")
    poller.poll(1)
    assert calls == ["other"]
    assert [type(exc) for exc, _ in poller.errors] == [ValueError]
    poller.clear_reader(other_left.fileno())
    other_left.close()
    other_right.close()


def test_callback_unregistered_earlier_in_the_batch_is_not_called(poller, pair):
    left, right = pair
    other_left, other_right = socket.socketpair()
    calls = []

    def first():
        calls.append("first")
        poller.clear_reader(left.fileno())
        poller.clear_reader(other_left.fileno())

    poller.set_reader(left.fileno(), first)
    poller.set_reader(other_left.fileno(), first)
    right.send(b"x")
    other_right.send(b"y")
    poller.poll(1)
    assert calls == ["first"]
    other_left.close()
    other_right.close()


def test_a_reused_fd_number_can_be_registered_again(poller):
    first, peer = socket.socketpair()
    fd = first.fileno()
    poller.set_reader(fd, lambda: None)
    first.close()  # closed behind the poller's back
    peer.close()
    poller.clear_reader(fd)
    again, again_peer = socket.socketpair()
    calls = []
    poller.set_reader(again.fileno(), lambda: calls.append("again"))
    again_peer.send(b"z")
    poller.poll(1)
    assert calls == ["again"]
    poller.clear_reader(again.fileno())
    again.close()
    again_peer.close()


def test_regular_files_are_refused(poller, tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"")
    with open(path, "rb") as file:
        if isinstance(poller, EpollPoller):
            with pytest.raises(PermissionError):
                poller.set_reader(file.fileno(), lambda: None)
            assert poller.reader_of(file.fileno()) is None


def test_environment_selects_the_fallback_poller(monkeypatch):
    monkeypatch.setenv("REACTOR_POLLER", "selectors")
    fallback = new_poller(lambda *args: None)
    monkeypatch.delenv("REACTOR_POLLER")
    default = new_poller(lambda *args: None)
    assert isinstance(fallback, SelectorPoller)
    assert isinstance(default, EpollPoller)
    fallback.close()
    default.close()
