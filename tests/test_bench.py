"""The benchmark's own logic: which CPU a table says, what it skips, its progress lines, the worker's
stream, the table, and the llama.cpp peer adapter against a stand-in llama-server on loopback.

No timing is asserted: the figures are whatever this machine gives; what is checked is that they are
measured, carried and labelled as they should be."""

from __future__ import annotations

import io
import json
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from service.dev import bench, peer
from tests.support.paths import ROOT

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes

processor\t: 1
model name\t: something else
"""

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_label_names_the_model_family_and_the_flags_that_choose_kernels():
    cpu = bench.parse_cpuinfo(EPYC_AVX2)
    assert (cpu.model_name, cpu.family, cpu.model) == ("AMD EPYC", "25", "1")
    label = cpu.label(torch_capability="AVX2")
    assert label == (
        "AMD EPYC (family 25, model 1): avx2; no avx512f, avx512_vnni, avx512_bf16, amx; "
        "torch CPU capability AVX2"
    )
    xeon = bench.parse_cpuinfo(XEON_AMX)
    assert xeon.label() == "Intel(R) Xeon(R) Platinum 8480C (family 6, model 143): " + ", ".join(
        bench.CPU_FLAGS
    )


def test_a_capped_instruction_set_is_labelled_as_a_cap_on_the_real_cpu():
    xeon = bench.parse_cpuinfo(XEON_AMX)
    label = xeon.label("AVX2", "AVX2")
    assert label.startswith(
        "AVX2 cap on Intel(R) Xeon(R) Platinum 8480C (family 6, model 143): avx2, avx512f"
    )
    assert not xeon.bf16_compute("AVX2") and xeon.bf16_compute("")


def test_missing_cpuinfo_is_said_not_guessed(tmp_path: Path):
    cpu = bench.read_cpu(str(tmp_path / "nope"))
    assert "unknown CPU" in cpu.label() and "none of" in cpu.label()


def test_bfloat16_without_bf16_instructions_skips_its_long_prompts_and_chats():
    avx2 = bench.parse_cpuinfo(EPYC_AVX2)
    plans = {p.precision: p for p in bench.make_plans(["bfloat16", "int8"], avx2)}
    assert not plans["bfloat16"].long_prompts and not plans["bfloat16"].chats
    assert any("no avx512_bf16" in why for why in plans["bfloat16"].skipped)
    assert plans["int8"].long_prompts and plans["int8"].chats and plans["int8"].skipped == ()

    forced = bench.make_plans(["bfloat16"], avx2, everything=True)[0]
    assert forced.long_prompts and forced.chats

    native = bench.make_plans(["bfloat16"], bench.parse_cpuinfo(XEON_AMX))[0]
    assert native.long_prompts and native.chats
    capped = bench.make_plans(["bfloat16"], bench.parse_cpuinfo(XEON_AMX), isa="AVX2")[0]
    assert not capped.long_prompts and any("cap" in why for why in capped.skipped)


def test_quick_never_reads_the_2000_token_prompt_but_keeps_the_chats():
    for plan in bench.make_plans(["int8", "int4"], bench.parse_cpuinfo(XEON_AMX), quick=True, repeat=2):
        assert not plan.long_prompts and plan.chats and plan.repeat == 2
        assert plan.skipped == ("TTFT 2000 and next turn: --quick",)


def test_progress_lines_say_who_which_phase_when_and_the_figure():
    out = io.StringIO()
    now = iter([100.0, 100.0 + 83.4, 100.0 + 3725.0])
    progress = bench.Progress(out, clock=lambda: next(now))
    progress(
        "int8", {"event": "figure", "phase": "ttft_256", "value": 3.05, "unit": "s", "run": 1, "runs": 2}
    )
    progress("int4", {"event": "phase", "phase": "chats", "note": "run 1/2"})
    assert out.getvalue().splitlines() == [
        "[ 1:23] int8: TTFT 256 run 1/2: 3.05 s",
        "[62:05] int4: 4 chats… (run 1/2)",
    ]
    assert bench.describe_event("x", {"event": "result"}, 0) is None


def test_worker_events_are_told_from_anything_else_it_prints():
    assert bench.parse_event('{"event": "phase", "phase": "load"}\n') == {"event": "phase", "phase": "load"}
    for noise in ("loading weights...\n", "{not json\n", '{"no": "event"}\n', "[1, 2]\n"):
        assert bench.parse_event(noise) is None


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_worker_streams_its_progress_and_hands_back_its_result(tmp_path: Path):
    cmd = _script(
        tmp_path,
        """
        import json, sys
        def emit(e): print(json.dumps(e), flush=True)
        emit({"event": "phase", "phase": "load"})
        print("a library chatting on stdout", flush=True)
        print("a warning", file=sys.stderr)
        emit({"event": "figure", "phase": "decode", "value": 7.5, "unit": "tok/s", "run": 1, "runs": 1})
        emit({"event": "result", "result": {"precision": "int8"}})
        """,
    )
    out = io.StringIO()
    result = bench.run_worker(cmd, {}, "int8", bench.Progress(out))
    assert result == {"precision": "int8"}
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("int8: load…")
    assert lines[1] == "a library chatting on stdout"
    assert lines[2].endswith("int8: decode run 1/1: 7.5 tok/s")
    assert "a warning" not in out.getvalue()


def test_a_failed_worker_says_why(tmp_path: Path):
    cmd = _script(
        tmp_path, "import sys\nprint('out of memory while loading', file=sys.stderr)\nsys.exit(3)\n"
    )
    with pytest.raises(bench.WorkerFailed, match="exited with 3[\\s\\S]*out of memory while loading"):
        bench.run_worker(cmd, {}, "float32", bench.Progress(io.StringIO()))


def _ours(precision: str, **over) -> dict:
    r = {
        "precision": precision,
        "load_s": 20.0,
        "peak_rss_gib": 2.33,
        "ttft_256_s": 3.05,
        "ttft_2000_s": 24.96,
        "ttft_next_turn_50_s": 0.98,
        "ttft_fresh_50_s": 0.73,
        "decode_tok_s": 7.5,
        "skipped": [],
        "chats": {
            "kind": "after_prompts",
            "aggregate_tok_s": 24.0,
            "alone_tok_s": 7.5,
            "ratio": 3.2,
            "first_token_s": [3.1, 4.0, 4.9, 5.8],
            "token_64_s": [12.0, 12.9, 13.8, 14.7],
            "ordered": True,
        },
    }
    r.update(over)
    return r


def test_report_says_the_cpu_then_the_table_with_every_row_on_it():
    skipped = ["TTFT 2000 and next turn: no avx512_bf16 or amx_bf16 on this CPU (--all measures them)"]
    bf16 = _ours("bfloat16", decode_tok_s=2.5, ttft_2000_s=None, ttft_next_turn_50_s=None, chats=None)
    bf16["skipped"] = skipped
    llama = {
        "engine": "llama.cpp Q4_K_M",
        "load_s": 0.4,
        "peak_rss_gib": 1.61,
        "ttft_256_s": 11.9,
        "decode_tok_s": 8.1,
        "command": ["llama-server", "-m", "q.gguf"],
    }
    text = bench.report("AMD EPYC (family 25, model 1): avx2", "setup", [bf16, _ours("int8")], [llama])
    lines = text.splitlines()
    assert lines[0] == "CPU: AMD EPYC (family 25, model 1): avx2"
    assert lines[3] == bench.HEADER
    assert lines[5].startswith("| qwen-box bfloat16 | 20.0 | 2.33 | 3.05 s | — | — | 2.5 | 1.00× | — | — |")
    assert lines[6] == (
        "| qwen-box int8 | 20.0 | 2.33 | 3.05 s | 24.96 s | 0.98 / 0.73 s (1.34×) | 7.5 | 3.00× | "
        "24.0 (3.2×) | 5.8 / 12.0 s: yes |"
    )
    assert lines[7] == "| llama.cpp Q4_K_M | 0.4 | 1.61 | 11.9 s | — | — | 8.1 | 3.24× | — | — |"
    assert f"bfloat16: skipped {skipped[0]}" in lines
    assert any(line.startswith("int8: 4 chats (median run): 3.2× one chat's 7.5 tok/s") for line in lines)
    assert "llama.cpp Q4_K_M: llama-server -m q.gguf" in lines


def test_capped_rows_say_so_and_a_late_first_token_is_a_no():
    late = _ours("int8")
    late["chats"] = {**late["chats"], "first_token_s": [3.1, 8.0, 13.0, 18.0], "ordered": False}
    row = bench.table([late], isa="AVX2").splitlines()[2]
    assert row.startswith("| qwen-box int8 (AVX2 cap) |") and row.endswith("| 18.0 / 12.0 s: no |")
    old = _ours(
        "int8",
        chats={"kind": "prompts_included", "aggregate_tok_s": 23.65, "alone_tok_s": 7.6, "ratio": 3.11},
    )
    assert "| 23.65 incl. prompts (3.11×) | — |" in bench.table([old])


def test_peer_needs_its_binary_and_model_and_refuses_a_cap(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--peer", "llama.cpp", "--peer-model", "x.gguf"])
    assert "--peer-bin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(
            ["--peer", "llama.cpp", "--peer-bin", str(tmp_path), "--peer-model", "x.gguf", "--isa", "AVX2"]
        )
    assert "uncapped" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, label",
    [
        ("qwen2.5-1.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("qwen2.5-1.5b-instruct-q8_0.gguf", "Q8_0"),
        ("random-qwen2.5-1.5b-f16.gguf", "F16"),
        ("model.gguf", "model.gguf"),
    ],
)
def test_the_peer_row_is_named_by_the_files_quantization(name: str, label: str):
    assert peer.quant_label(name) == label


def test_the_stream_is_timed_per_token_as_it_arrives():
    events = [b": comment\n", b"\n"]
    events += [
        f"data: {json.dumps({'content': '', 'tokens': [i], 'stop': False})}\n".encode() for i in range(4)
    ]
    events += [b'data: {"content": "", "stop": true, "timings": {"predicted_n": 4}}\n']
    clock = iter([1.5, 2.0, 2.5, 3.0, 3.5])
    done = peer.read_stream(events, sent_at=1.0, clock=lambda: next(clock))
    assert (done.ttft_s, done.decode_tok_s, done.tokens) == (0.5, 2.0, 4)
    assert done.server == {"predicted_n": 4}
    with pytest.raises(RuntimeError, match="no tokens"):
        peer.read_stream([b'data: {"stop": true}\n'], sent_at=0.0)
    with pytest.raises(RuntimeError, match="context size"):
        peer.read_stream([b'data: {"error": {"message": "context size exceeded"}}\n'], sent_at=0.0)


def _fake_llama_server(tmp_path: Path) -> Path:
    build = tmp_path / "llama.cpp" / "build" / "bin"
    build.mkdir(parents=True)
    exe = build / "llama-server"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests/support/fake_llama_server.py"} "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "llama.cpp"


def test_the_peer_is_measured_like_our_engine_through_its_http_api(tmp_path: Path, monkeypatch):
    folder = _fake_llama_server(tmp_path)
    gguf = tmp_path / "qwen2.5-1.5b-instruct-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    requests_log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(requests_log))
    events: list[dict] = []
    row = peer.measure(folder, gguf, threads=2, repeat=2, new_tokens=6, vocab=1000, emit=events.append)

    assert row["engine"] == "llama.cpp Q4_K_M"
    assert row["load_s"] > 0 and row["peak_rss_gib"] > 0 and row["ttft_256_s"] > 0 and row["decode_tok_s"] > 0
    assert len(row["decode_runs"]) == 2 and row["server_prompt_tok_s"] == 25600.0
    command = row["command"]
    assert command[0] == str(folder / "build" / "bin" / "llama-server")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("-t") + 1] == "2" and command[command.index("-np") + 1] == "1"

    sent = [json.loads(line) for line in requests_log.read_text().splitlines()]
    assert [len(s["prompt"]) for s in sent] == [32, 256, 256]  # a warm-up, then fresh 256-token prompts
    assert sent[1]["prompt"] != sent[2]["prompt"]
    assert all(100 <= t < 900 for s in sent for t in s["prompt"])
    for s in sent[1:]:
        assert s["n_predict"] == 6 and s["stream"] is True and s["cache_prompt"] is False
        assert s["temperature"] == 0 and s["ignore_eos"] is True
    phases = [(e["event"], e["phase"]) for e in events]
    assert phases[:2] == [("phase", "load"), ("figure", "load")]
    assert phases.count(("figure", "decode")) == 2 and phases.count(("figure", "ttft_256")) == 2


def test_a_peer_that_cannot_load_its_model_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "log"))
    with pytest.raises(RuntimeError, match="failed to load model"):
        peer.measure(
            _fake_llama_server(tmp_path), tmp_path / "missing.gguf", threads=2, repeat=1, new_tokens=2
        )
    with pytest.raises(FileNotFoundError, match="no llama-server"):
        peer.server_binary(tmp_path)


def test_quick_bench_on_the_tiny_model_prints_progress_then_the_labelled_table(
    endless_model_dir: Path, tmp_path: Path
):
    import subprocess

    from service.dev.tiny_vision import build_tiny_vision

    out = tmp_path / "bench.json"
    vision = build_tiny_vision(tmp_path / "tiny-smolvlm", endless=True)
    done = subprocess.run(
        [sys.executable, "-m", "service.dev.bench", "--model", str(endless_model_dir), "--quick"]
        + ["--repeat", "1", "--new-tokens", "4", "--chat-tokens", "66", "--json", str(out)]
        + ["--vision-model", str(vision), "--no-quality"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    progress = done.stderr
    for expected in (
        "plan int8:",
        "int8: load: ",
        "int8: TTFT 256 run 1/1: ",
        "int8: decode run 1/1: ",
        "4 chats",
    ):
        assert expected in progress
    assert "skipping TTFT 2000 and next turn: --quick" in progress
    assert "vision: plan int8: one picture of 1,048,576 pixels + a question" in progress
    report = done.stdout.splitlines()
    assert report[0].startswith("CPU: ") and "family" in report[0] and "torch CPU capability" in report[0]
    assert bench.HEADER in report
    row = next(line for line in report if line.startswith("| qwen-box int8 |"))
    assert "| — | — |" in row  # no 2,000-token prompt, no next turn
    saved = json.loads(out.read_text())
    assert saved["cpu_label"] == report[0].removeprefix("CPU: ")
    (result,) = saved["results"]
    assert (
        result["precision"] == "int8"
        and result["ttft_2000_s"] is None
        and result["chats"]["aggregate_tok_s"] > 0
    )
    # the vision row, under the text default's row, labelled with the same CPU
    assert f"Images (CPU: {saved['cpu_label']}):" in report
    text_row = next(
        line for line in report if line.startswith("| qwen-box int8 (text default) | 256 tokens |")
    )
    vision_row = report[report.index(text_row) + 1]
    assert vision_row.startswith("| tiny-smolvlm (int8 language model, float32 vision encoder) | 1024x1024 ")
    assert saved["vision"]["ttft_s"] > 0 and saved["vision"]["decode_tokens_per_s"] > 0
    assert saved["vision"]["image_tokens"] > 0 and saved["vision"]["peak_rss_gib"] > 0


def test_bench_quality_prints_each_precision_against_float32(tiny_model_dir: Path, tmp_path: Path):
    """`invoke bench --quality --model PATH`: the quality table alone, for any model folder (here the
    tiny one, so it takes seconds; the real check of the figures is tests/test_quality.py)."""
    import subprocess

    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, "-m", "service.dev.bench", "--quality", "--model", str(tiny_model_dir)]
        + ["--precisions", "int8,int4", "--quality-chunks", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Quality against float32 (CPU: " in done.stdout and "1 chunks of 512 tokens of GPL-3" in done.stdout
    )
    rows = {r["precision"]: r for r in json.loads(out.read_text())["quality"]["rows"]}
    assert set(rows) == {"int8", "int4"}
    for r in rows.values():
        assert r["tokens"] == 255 and r["kl_divergence"] > -1e-4 and 0 <= r["top1_agreement"] <= 1
        assert f"| {r['precision']} | " in done.stdout
