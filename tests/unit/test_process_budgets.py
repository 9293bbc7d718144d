"""What each worker process of a node gets (``nimbus.processes.worker_settings``), and its node id."""

import pytest
from pydantic import ValidationError

from nimbus.app import node_id
from nimbus.config import Settings
from nimbus.processes import worker_settings


@pytest.mark.parametrize("processes", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(("base", "count"), [(0x70000000, 65536), (0x70000000, 10), (100000, 8)])
def test_uid_slices_are_disjoint_and_inside_the_range(processes, base, count):
    if count < processes:
        pytest.skip("refused by the settings (below)")
    settings = Settings(processes=processes, machine_uid_base=base, machine_uid_count=count)
    slices = [range(s.machine_uid_base, s.machine_uid_base + s.machine_uid_count)
              for s in (worker_settings(settings, i) for i in range(processes))]
    assert all(len(span) >= 1 for span in slices)
    seen: set[int] = set()
    for span in slices:
        assert base <= span.start and span.stop <= base + count
        assert not seen & set(span), "two workers share a machine uid"
        seen |= set(span)


def test_budgets_are_split_and_the_index_is_set():
    settings = Settings(processes=2, max_machines=64, max_warm=8, min_warm=1, workers=64, queue_size=1024,
                        code_cache_mb=256, max_function_templates=16, rate_limit=100.0, rate_burst=5)
    mine = [worker_settings(settings, i) for i in range(2)]
    assert [s.process_index for s in mine] == [0, 1]
    assert settings.process_index == 0
    for s in mine:
        assert (s.max_machines, s.max_warm, s.min_warm, s.workers, s.queue_size) == (32, 4, 1, 32, 512)
        assert (s.code_cache_mb, s.max_function_templates, s.rate_limit, s.rate_burst) == (128, 8, 50.0, 3)
        assert s.home == settings.home and s.db_url == settings.db_url and s.port == settings.port
    with pytest.raises(ValueError):
        worker_settings(settings, 2)


def test_one_process_keeps_the_settings_as_they_are():
    settings = Settings(max_machines=5, machine_uid_count=7)
    assert worker_settings(settings, 0) is settings


def test_floors_stay_whole_per_worker():
    settings = Settings(processes=4, max_warm=2, min_warm=2, max_function_templates=1)
    s = worker_settings(settings, 3)
    assert s.max_warm == 2 and s.min_warm == 2 and s.max_function_templates == 1


@pytest.mark.parametrize("name", ["max_machines", "machine_uid_count"])
def test_more_processes_than_machines_or_uids_is_refused(name):
    with pytest.raises(ValidationError, match="NIMBUS_PROCESSES"):
        Settings(processes=4, **{name: 3})


def test_each_worker_has_a_stable_node_id_of_its_own(tmp_path):
    ids = [node_id(tmp_path, i) for i in range(3)]
    assert len(set(ids)) == 3
    assert ids == [node_id(tmp_path, i) for i in range(3)]
    assert ids[1] == f"{ids[0]}-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-id"]
