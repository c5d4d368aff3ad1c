"""The `dsv4` command line, through subprocesses and a pseudo-terminal."""

import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

DSV4 = [sys.executable, "-m", "dsv4"]


def run(*args, input=None, timeout=120):
    return subprocess.run([*DSV4, *map(str, args)], capture_output=True, text=True, input=input, timeout=timeout)


@pytest.mark.parametrize("cmd", ["run", "chat", "inspect", "tiny"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: dsv4" in r.stdout


def test_run_streams_text_and_reports_speed(tiny_ckpt):
    r = run("run", "--model", tiny_ckpt("vocab").path, "--raw", "--temperature", "0", "--max-tokens", "6", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")
    assert "6 generated" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


def test_run_reads_stdin_and_is_deterministic_with_a_seed(tiny_ckpt):
    args = ("run", "--model", tiny_ckpt("vocab").path, "--max-tokens", "8", "--seed", "3", "--quiet")
    a, b = run(*args, input="Tell me"), run(*args, input="Tell me")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stderr.strip() == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/no/such/dir", "hi"], "no config.json"),
        (["--temperature", "-1", "hi"], "temperature must be"),
        (["--max-tokens", "0", "hi"], "max_tokens must be"),
    ],
)
def test_run_bad_input_is_one_line(tiny_ckpt, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_ckpt("vocab").path), *args]
    r = run("run", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4 run: error:") and message in lines[0]


def test_chat_format_and_reasoning_effort_flags(tiny_ckpt):
    """0731's "high" is the preview's "max" text and its "max" a longer one (92 tokens against 79):
    the prompt sizes say which text went in; a level the format lacks is a one-line error."""
    base = ("run", "--model", tiny_ckpt("vocab").path, "--temperature", "0", "--max-tokens", "2", "Hello")

    def prompt_tokens(fmt, effort):
        r = run(*base, "--chat-format", fmt, "--reasoning-effort", effort)
        assert r.returncode == 0, r.stderr
        return int(r.stderr.split("[", 1)[1].split(" prompt tokens")[0]), r.stdout

    high = prompt_tokens("0731", "high")
    assert prompt_tokens("preview", "max") == high and prompt_tokens("0731", "max")[0] == high[0] + 92 - 79
    r = run(*base, "--chat-format", "0731", "--reasoning-effort", "medium")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "dsv4 run: error: reasoning_effort 'medium': the 0731 chat format has low, high, max"
    ]


def test_run_under_a_budget_gives_the_resident_output(tiny_ckpt):
    base = ("run", "--model", tiny_ckpt("vocab").path, "--raw", "--temperature", "0", "--max-tokens", "6", "--quiet")
    outs = [run(*base, *extra, "Hello") for extra in
            (["--max-ram", "none"], ["--max-ram", "1G", "--cache-policy", "lru"], ["--max-ram", "1G"])]  # fmt: skip
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    r = run(*base, "--cache-policy", "fifo", "Hello")
    assert r.returncode == 2 and "--cache-policy" in r.stderr


def test_inspect(tiny_ckpt):
    r = run("inspect", "--model", tiny_ckpt("flash").path)
    assert r.returncode == 0
    assert "4 layers" in r.stdout and "MXFP4" in r.stdout and "active per token" in r.stdout and "[SCHC]" in r.stdout
    assert "release      V4 preview (MTP draft); chat format preview" in r.stdout


def test_chat_in_a_terminal(tiny_ckpt, tmp_path):
    """History, /save, /reset, and Ctrl-C stopping a reply without leaving."""
    model = tiny_ckpt("vocab").path
    child = pexpect.spawn(DSV4[0], [*DSV4[1:], "chat", "--model", str(model), "--temperature", "0", "--max-tokens", "8"],
                          encoding="utf-8", timeout=120)  # fmt: skip
    child.expect(">>> ")
    child.sendline("Hello")
    child.expect(">>> ")
    child.sendline("/save " + str(tmp_path / "chat.json"))
    child.expect(r"saved 2 messages")
    child.sendline("/reset")
    child.expect(r"new conversation")
    child.sendline("/max")  # unknown command
    child.expect("unknown command")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    saved = (tmp_path / "chat.json").read_text()
    assert '"role": "user"' in saved and '"role": "assistant"' in saved


def test_chat_ctrl_c_stops_the_reply(tiny_ckpt):
    model = tiny_ckpt("vocab").path
    child = pexpect.spawn(DSV4[0], [*DSV4[1:], "chat", "--model", str(model), "--max-tokens", "100000"],
                          encoding="utf-8", timeout=120)  # fmt: skip
    child.expect(">>> ")
    child.sendline("Write forever")
    child.expect_exact("Write forever\r\n")  # the terminal's echo of the line
    child.expect(r"\S{3}")  # then the reply has started
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")  # still in the chat
    child.sendeof()
    child.expect(pexpect.EOF)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_up_to_the_context_without_max_tokens(tiny_ckpt):
    """`dsv4 serve`: a request without max_tokens is not cut at run's --max-tokens default; the cap is a
    flag shown in --help. --threads reaches the generation thread (torch's default is one per core)."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([*DSV4, "serve", "--model", str(tiny_ckpt("vocab").path), "--port", str(port),
                             "--max-context", "300", "--max-ram", "none", "--log-level", "warning",
                             "--threads", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                health = httpx.get(url + "/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert health.json()["threads"] == 3, health.text
        body = {"model": Path(tiny_ckpt("vocab").path).name, "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] > 256 and usage["prompt_tokens"] + usage["completion_tokens"] == 300
        assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        proc.terminate()
        proc.wait(30)
    flag_help = run("serve", "--help").stdout.split("\n  --max-tokens", 1)[1].split("\n  --", 1)[0]
    assert "context" in flag_help, flag_help
