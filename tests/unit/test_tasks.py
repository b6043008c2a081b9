"""What the DAG's tasks say when a run ends red."""

from __future__ import annotations

from typing import Any

from leadsync.tasks import failed_tasks, pending_message


class _TI:
    dag_id = "leadsync_meta"
    run_id = "manual__1"

    def __init__(self, states: dict[str, Any] | Exception) -> None:
        self.states = states

    def get_task_states(self, dag_id: str, run_ids: list[str]) -> dict[str, Any]:
        if isinstance(self.states, Exception):
            raise self.states
        assert (dag_id, run_ids) == (self.dag_id, [self.run_id])
        return {self.run_id: self.states}


def test_failed_tasks_lists_only_the_failed_ones() -> None:
    ti = _TI({"check_contract": "success", "push_lane_0": "success", "push_lane_1": "failed",
              "commit_watermark": "running", "check_requests": "upstream_failed"})
    assert failed_tasks(ti) == ["push_lane_1"]
    assert failed_tasks(_TI(RuntimeError("no supervisor"))) is None


def test_pending_message_blames_only_a_task_that_failed() -> None:
    assert pending_message("meta", 3, ["push_lane_1"]) == (
        "3 outbox batch(es) of meta are still pending: push_lane_1 failed (see its log); "
        "the next run resends them with the same event ids")
    nobody = pending_message("meta", 1, [])
    assert "no task of this run failed" in nobody and "push_lane" not in nobody
    unknown = pending_message("meta", 1, None)
    assert "see this run's task logs" in unknown and "failed" not in unknown
