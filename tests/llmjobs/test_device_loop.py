"""The device loop's bookkeeping, in-process: what it holds, and the watchdog's rules."""

import time

from llmjobs.device import DeviceLoop, Step, Watchdog
from llmjobs.engine import Ticket


def test_a_redelivered_message_of_a_held_job_is_not_run_twice():
    loop = DeviceLoop("cpu", build=lambda name: None, max_batch_of=lambda name: None)
    held = Ticket("job-1", "echo", "run", "x", worker="w")
    assert loop.submit(held) is True
    assert loop.submit(Ticket("job-1", "echo", "run", "x", worker="w")) is False
    loop.release(held)
    assert loop.submit(Ticket("job-1", "echo", "run", "x", worker="w")) is True


def test_the_watchdog_interrupts_a_single_job_at_its_soft_limit_only_once():
    loop = DeviceLoop("cpu", build=lambda name: None, max_batch_of=lambda name: None)
    interrupts = []
    watchdog = Watchdog(loop)
    watchdog.interrupt_device_thread = lambda: interrupts.append(1)
    ticket = Ticket("job-2", "echo", "run", "x", worker="w", soft_limit_s=1, hard_limit_s=3)
    ticket.started = time.monotonic() - 1.5
    step = Step([ticket], began=ticket.started, interruptible=True)
    watchdog.check(step, time.monotonic())
    watchdog.check(step, time.monotonic())
    assert interrupts == [1]
    batch_step = Step([ticket], began=ticket.started, interruptible=False)
    watchdog.check(batch_step, time.monotonic())  # a batch step is never interrupted, only left
    assert interrupts == [1]
