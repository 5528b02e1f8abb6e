"""The restart backoff `serve` and `runworker` share: prompt after a crash, doubling
while a child keeps dying, short again once it ran steadily."""

from djangollmapi.supervision import MAX_BACKOFF_S, STEADY_S, Backoff


def test_a_child_that_keeps_dying_waits_longer_each_time_up_to_the_cap():
    backoff = Backoff()
    delays = [backoff.after(ran_s=1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_a_child_that_ran_steadily_is_restarted_promptly_again():
    backoff = Backoff()
    for _ in range(5):
        backoff.after(ran_s=1.0)
    assert backoff.after(ran_s=STEADY_S + 1) == 0.5
    assert backoff.after(ran_s=1.0) == 1.0
