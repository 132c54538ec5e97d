"""The step and jit contexts are per thread: concurrent steps neither see nor leak each other's."""

import threading

from craftfn import _context


def test_interleaved_threads_see_their_own_context_and_leave_none_behind():
    # Thread a enters, b enters, a exits, b exits: with one process-wide slot, b's exit restored a's
    # context for everyone (a later donated step in the main thread then skipped its marking).
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def run(name, training, enter_after, exit_after, done):
        enter_after and enter_after.wait(5)
        with _context.step_context(training=training), _context.jit_context(donating=training):
            done[0].set()
            exit_after and exit_after.wait(5)
            seen[name] = (_context.current().training, _context.current_jit().donating)
        done[1].set()

    ta = threading.Thread(target=run, args=("a", True, None, b_in, (a_in, a_out)))
    tb = threading.Thread(target=run, args=("b", False, a_in, a_out, (b_in, threading.Event())))
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert seen == {"a": (True, True), "b": (False, False)}
    assert _context.current() is None and _context.current_jit() is None
