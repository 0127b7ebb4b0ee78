"""On CPU a cell computes on one thread (its result must not depend on the core count), and the micro
profile runs one worker per core by default."""
def test_default_workers_one_per_core_for_micro_cells_on_cpu(monkeypatch):
    from bench import workers
    monkeypatch.delenv(workers.WORKERS_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(workers, "cpu_cores", lambda: 4)
    micro = [{"data_source": "synthetic"}] * 3
    assert workers.default_workers(micro, "cpu") == 3                 # at most one per cell
    assert workers.default_workers(micro * 2, "cpu") == 4             # one per core
    assert workers.default_workers(micro, "cuda") == 1                # GPUs: serial unless asked
    assert workers.default_workers([{"data_source": "folder"}] * 6, "cpu") == 1   # real data: serial
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert workers.default_workers(micro * 2, "cpu") == 1             # torchrun: every rank runs the cells
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(workers.WORKERS_ENV, "2")
    assert workers.default_workers(micro * 2, "cpu") == 2


def test_a_cpu_cell_computes_on_one_thread():
    import torch

    from bench.workers import single_thread_on_cpu
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread_on_cpu("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with single_thread_on_cpu("cuda"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
