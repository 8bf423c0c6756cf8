"""Running a coroutine by hand up to its first wait, for hot paths that usually need none."""

from __future__ import annotations


class Resume:
    """Awaits a coroutine that was run by hand (`coro.send(None)`) up to its first wait, where it
    yielded `first`; it goes on in the awaiting task. Lets a hot path try work that usually needs no
    waiting without paying for a timer (or a task), and bound it only when it does wait."""

    __slots__ = ("coro", "first")

    def __init__(self, coro, first):
        self.coro, self.first = coro, first

    def __await__(self):
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a timeout's cancellation)
                try:
                    value = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value
