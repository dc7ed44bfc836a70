"""`llmqp.ray`: the Ray Data Extractor and `llmqp batch --ray` on a local cluster the test starts, against the
single-process path (greedy: equal rows). Needs the `ray` extra (`pip install 'llmqp[ray]'`)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import llmqp
from llmqp.batch import BatchConfig, run_batch
from llmqp.ray import batch_rows, import_ray
from test_batch import ROWS, SCHEMA, TEMPLATE, read_output, write_lines


def test_missing_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(llmqp.LLMQPError, match=r"pip install 'llmqp\[ray\]'"):
        import_ray()
    from llmqp.cli import main

    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    assert main(["batch", str(src), "-o", str(tmp_path / "out.jsonl"), "--ray"]) == 2
    assert "llmqp: error: Ray is not installed: pip install 'llmqp[ray]'" in capsys.readouterr().err


def test_batch_rows_from_numpy_pandas_and_arrow():
    pd = pytest.importorskip("pandas")
    numpy_batch = {"id": np.array([1, 2]), "prompt": np.array(["a", "b"], dtype=object),
                   "choice": np.array([np.array(["x", "y"], dtype=object), None], dtype=object)}
    assert batch_rows(numpy_batch) == [{"id": 1, "prompt": "a", "choice": ["x", "y"]},
                                       {"id": 2, "prompt": "b", "choice": None}]
    frame = pd.DataFrame({"prompt": ["a", "b"], "regex": ["[0-9]+", np.nan], "n": [np.int64(3), np.int64(4)]})
    assert batch_rows(frame) == [{"prompt": "a", "regex": "[0-9]+", "n": 3}, {"prompt": "b", "regex": None, "n": 4}]
    import pyarrow as pa

    table = pa.table({"prompt": ["a", "b"], "choice": [["x", "y"], None]})
    assert batch_rows(table) == [{"prompt": "a", "choice": ["x", "y"]}, {"prompt": "b", "choice": None}]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'llmqp[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_extractor_and_cli_ray_equal_single_process(local_ray, engine, tmp_path):
    rows = ROWS[:4] + [{"id": "own-choice", "text": "Is the sky blue?", "choice": ["yes", "no"]}]
    src = write_lines(tmp_path / "in.jsonl", rows + ["{broken"])
    config = BatchConfig(template=TEMPLATE, json_schema=SCHEMA, max_tokens=24, max_batch=2)
    single = tmp_path / "single.jsonl"
    run_batch(engine, src, single, config, progress=False)
    expected = {r["id"]: r for r in read_output(single)}
    assert len(expected) == 6 and expected[6]["finish_reason"] == "error"

    # The Python API: a dataset with ordinary columns; one engine per actor.
    ds = local_ray.data.from_items([{"id": r["id"], "text": r["text"], "choice": r.get("choice")} for r in rows])
    out = ds.map_batches(llmqp.ray.Extractor, concurrency=1, batch_size=4,
                         fn_constructor_kwargs=dict(template=TEMPLATE, json_schema=SCHEMA, max_tokens=24,
                                                    max_batch=2)).take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    for r in out:
        want = expected[r["id"]]
        value = None if r["value"] is None else json.loads(r["value"])
        assert (r["text"], value, bool(r["valid"]), r["finish_reason"], r["error"]) == \
            (want["text"], want["value"], want["valid"], want["finish_reason"], want["error"]), r["id"]
        assert r["output_tokens"] > 0

    # The CLI on the running cluster, two actors: the same output file as the single-process run.
    from llmqp.cli import main

    ray_out = tmp_path / "ray.jsonl"
    argv = ["batch", str(src), "-o", str(ray_out), "--template", TEMPLATE, "--json-schema", json.dumps(SCHEMA),
            "--max-tokens", "24", "--max-batch", "2", "--no-progress", "--ray", "--actors", "2"]
    assert main(argv) == 0
    got = read_output(ray_out)
    assert len(got) == len(expected) and {r["id"]: r for r in got} == expected
    assert main(argv) == 0 and len(read_output(ray_out)) == len(expected)  # resumed: nothing left to do
