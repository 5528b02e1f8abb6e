"""Fair admission across keys (pure logic): who gets a device's next free slot."""

from llmjobs.fairness import FairQueue


def drain(queue: FairQueue) -> list:
    order = []
    while (item := queue.pop()) is not None:
        order.append(item)
    return order


def test_one_key_runs_in_its_own_order():
    queue = FairQueue()
    for i in range(5):
        queue.push(f"a{i}", "A", f"a{i}")
    assert drain(queue) == ["a0", "a1", "a2", "a3", "a4"]


def test_a_late_key_goes_next_not_after_the_burst():
    queue = FairQueue()
    for i in range(200):
        queue.push(f"a{i}", "A", f"a{i}")
    assert queue.pop() == "a0"  # running
    queue.push("b0", "B", "b0")
    assert queue.position("b0") <= 1
    assert queue.items()[queue.position("b0")] == "b0"
    assert drain(queue)[:2] in (["b0", "a1"], ["a1", "b0"])


def test_keys_alternate_and_each_keeps_its_order():
    queue = FairQueue()
    for i in range(3):
        queue.push(f"a{i}", "A", f"a{i}")
    for i in range(3):
        queue.push(f"b{i}", "B", f"b{i}")
    order = drain(queue)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_heavier_key_gets_more_slots():
    queue = FairQueue()
    for i in range(12):
        queue.push(f"a{i}", "A", "A", weight=1)
        queue.push(f"b{i}", "B", "B", weight=3)
    first_eight = drain(queue)[:8]
    assert first_eight.count("B") == 6 and first_eight.count("A") == 2


def test_removed_jobs_are_skipped_and_positions_count_the_rest():
    queue = FairQueue()
    for i in range(4):
        queue.push(f"a{i}", "A", f"a{i}")
    assert queue.remove("a1") is True
    assert queue.remove("a1") is False
    assert queue.position("a3") == 2
    assert queue.peek() == "a0"
    assert drain(queue) == ["a0", "a2", "a3"]
    assert len(queue) == 0 and queue.position("a0") is None


def test_an_idle_key_earns_no_credit_for_later():
    queue = FairQueue()
    queue.push("b0", "B", "b0")
    assert queue.pop() == "b0"
    for i in range(3):
        queue.push(f"a{i}", "A", f"a{i}")
    queue.pop()
    for i in range(3):
        queue.push(f"b{i + 1}", "B", f"b{i + 1}")
    # B was away: it shares from now on, it does not get all its missed turns at once.
    assert drain(queue)[:4] in (["a1", "b1", "a2", "b2"], ["b1", "a1", "b2", "a2"])


def test_a_key_keeps_the_order_its_jobs_were_sent_in_whatever_order_they_arrive():
    queue = FairQueue()
    for sent in (3, 1, 2, 0):
        queue.push(f"a{sent}", "A", f"a{sent}", order=sent)
    assert drain(queue) == ["a0", "a1", "a2", "a3"]


def test_a_key_whose_jobs_were_all_removed_gets_one_share_when_it_returns():
    queue = FairQueue()
    queue.push("b0", "B", "b0")
    for i in range(6):
        queue.push(f"a{i}", "A", f"a{i}")
    queue.remove("b0")
    for i in range(1, 4):
        queue.push(f"b{i}", "B", f"b{i}")
    order = drain(queue)
    assert [job for job in order if job.startswith("b")] == ["b1", "b2", "b3"]
    # B and A alternate while both wait: B never takes two turns in a row.
    assert "b1b2" not in "".join(order) and "b2b3" not in "".join(order)
    assert queue.position("x") is None
