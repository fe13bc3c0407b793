"""The README's "Run the parts yourself" section, run command by command, so it cannot rot.

Every ```bash block of the section is tagged ``<!-- readme-test: NAME -->`` and every one is run
here: each line is one command, run with bash in one working directory; ``export`` lines set the
environment of the lines after them, a line ending in ``&`` starts a background process (stopped
with SIGTERM at the end, which must exit cleanly), every other line must exit 0. The README's
fixed ports and example addresses are swapped for free ports and the harness's services.

Besides what the README's own health commands show, the full bring-up checks that ``promtool
check metrics`` is clean on all four endpoints, that the joiner and the trainer said what the
attribution window means, and that the service's log holds no third-party noise.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.logs import OWN_PACKAGES
from core.settings import TopicNames
from streams.broker import free_port
from tests.promcheck import promtool_problems, scrape_text

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Run the parts yourself"
TAG = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*\n```bash\n(.*?)```", re.S)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")


def section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else None]


def blocks(tag: str) -> list[str]:
    """The command lines of the blocks tagged ``tag``, in order."""
    out = []
    for name, body in TAG.findall(section()):
        if name == tag:
            out += [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert out, f"no ```bash block tagged {tag!r} in the README's {SECTION!r}"
    return out


def test_every_command_block_of_the_section_is_run_by_a_test() -> None:
    text = section()
    assert text.count("```bash") == len(TAG.findall(text)), "an untagged ```bash block: tag it and run it here"
    assert {name for name, _ in TAG.findall(text)} == {"embedded-broker", "existing-services", "parts", "health",
                                                       "stop"}


class Shell:
    """Runs README lines the way the section says (see the module docstring)."""

    def __init__(self, cwd: Path, env: dict[str, str], swap: dict[str, str]) -> None:
        self.cwd, self.env, self.swap = cwd, env, swap
        self.background: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.outputs: dict[str, str] = {}
        self.stopped = False

    def _swapped(self, line: str) -> str:
        for a, b in self.swap.items():
            line = line.replace(a, b)
        return line

    def run(self, line: str, timeout: float = 300.0) -> str:
        line = self._swapped(line)
        code = line.split(" #", 1)[0].strip()
        if code.startswith("export "):
            for item in shlex.split(code)[1:]:
                k, _, v = item.partition("=")
                self.env[k] = v
            return ""
        if code.endswith("&"):
            cmd = code[:-1].strip()
            name = cmd.split()[1] + "-" + str(len(self.background))
            log = self.cwd / f"{name}.log"
            p = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=self.cwd, env=self.env,
                                 stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            self.background[cmd] = (p, log)
            return ""
        for cmd, (p, log) in self.background.items():
            assert self.stopped or p.poll() is None, f"`{cmd}` exited with {p.returncode}:\n{log.read_text()[-3000:]}"
        r = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"`{line}` exited with {r.returncode}:\n{out[-4000:]}\n{self.logs_tail()}"
        self.outputs[code] = out
        return out

    def logs_tail(self) -> str:
        return "\n".join(f"--- {c}\n{log.read_text()[-1500:]}" for c, (_p, log) in self.background.items())

    def stop(self) -> dict[str, int]:
        self.stopped = True
        for p, _log in self.background.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for cmd, (p, _log) in self.background.items():
            try:
                codes[cmd] = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[cmd] = p.wait(10)
        return codes


def _adstream_on_path(tmp_path: Path) -> str:
    """An ``adstream`` command that runs this checkout (the installed console script may not)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "adstream"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} "
                      f"-m adstream \"$@\"\n")
    script.chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ['PATH']}"


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSTREAM_") or k == "ADSTREAM_CACHE"}
    env["PATH"] = _adstream_on_path(tmp_path)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
@pytest.mark.kafka
def test_readme_bringup_by_hand(tmp_path: Path) -> None:
    """The whole section on the embedded broker: start, topics, history, workers, users, health, stop."""
    for tool in ("curl", "kcat", "promtool"):
        assert any((Path(d) / tool).exists() for d in os.environ["PATH"].split(os.pathsep)), \
            f"{tool} is not installed (.ci/run installs it from Debian)"
    work = tmp_path / "work"
    work.mkdir()
    ports = {"broker": free_port(), "controller": free_port(), "serve": free_port(), "joiner": free_port(),
             "features": free_port(), "trainer": free_port()}
    env = _base_env(tmp_path)
    env.update({"ADSTREAM_BROKER__PORT": str(ports["broker"]), "ADSTREAM_BROKER__CONTROLLER_PORT": str(ports["controller"]),
                "ADSTREAM_SERVE__PORT": str(ports["serve"]), "ADSTREAM_METRICS__SERVE_PORT": str(ports["serve"]),
                "ADSTREAM_METRICS__JOINER_PORT": str(ports["joiner"]),
                "ADSTREAM_METRICS__FEATURE_UPDATER_PORT": str(ports["features"]),
                "ADSTREAM_METRICS__TRAINER_PORT": str(ports["trainer"])})
    swap = {"127.0.0.1:19092": f"127.0.0.1:{ports['broker']}", ":8080": f":{ports['serve']}",
            ":9101": f":{ports['joiner']}", ":9102": f":{ports['features']}", ":9103": f":{ports['trainer']}"}
    sh = Shell(work, env, swap)
    broker_started = False
    try:
        for line in blocks("embedded-broker"):
            out = sh.run(line, timeout=180)
            broker_started = True
            if "broker status" in line:
                assert f"bootstrap=127.0.0.1:{ports['broker']}" in out and "running" in out, out
            if "topics list" in line:
                assert all(re.search(rf"^{t}\t6$", out, re.M) for t in ("impressions", "clicks", "examples")), out
        for line in blocks("parts"):
            out = sh.run(line, timeout=600)
            if "simulate-traffic" in line:
                assert '"delivery_failures": 0' in out and '"errors": 0' in out, out[-3000:]
                assert "requests done; waiting for" in out, out[-3000:]
        for line in blocks("health"):
            out = sh.run(line)
            if "readyz" in line:
                assert '"ready":true' in out and '"index_ads":' in out and '"index_ads":0' not in out, out
            if "models list" in line:
                assert re.search(r"^v\d{6}\s*\*\s*published", out, re.M), out
            if "-C -t examples" in line:
                assert '"clicked"' in out, out
        # beyond the README's own checks
        for name in ("joiner", "features", "trainer", "serve"):
            text = scrape_text(f"http://127.0.0.1:{ports[name]}/metrics")
            assert promtool_problems(text) == "", f"{name}:\n{promtool_problems(text)}"
        logs = {cmd.split()[1]: log.read_text() for cmd, (_p, log) in sh.background.items()}
        assert "attribution window 30s + allowed lateness 5s" in logs["joiner"]
        assert "attribution window 30s + allowed lateness 5s" in logs["train"]
        noise = [ln for ln in logs["serve"].splitlines() if ln.strip() and not (
            (m := LOG_LINE.match(ln)) and (m.group(1) != "INFO" or m.group(2).split(".")[0] in OWN_PACKAGES))]
        assert not noise, "third-party noise in the service's log:\n" + "\n".join(noise[:20])
        assert "TBE=" not in logs["serve"] and "TBE=" not in logs["train"]
        codes = sh.stop()
        assert all(c == 0 for c in codes.values()), (codes, sh.logs_tail())
    finally:
        sh.stop()
        if broker_started:
            for line in blocks("stop"):
                sh.run(line, timeout=120)


@pytest.mark.kafka
@pytest.mark.redis
def test_readme_existing_kafka_and_redis(tmp_path: Path, bootstrap: str, redis_server, unique_topic_prefix) -> None:
    """The section's other way in: every command pointed at a cluster and a Redis that already run."""
    work = tmp_path / "work"
    work.mkdir()
    env = _base_env(tmp_path)
    env.update({f"ADSTREAM_KAFKA__TOPICS__{k.upper()}": unique_topic_prefix + v for k, v in TopicNames().model_dump().items()})
    sh = Shell(work, env, {"kafka.example:9092": bootstrap, "redis.example:6379": f"127.0.0.1:{redis_server.port}"})
    for line in blocks("existing-services"):
        out = sh.run(line, timeout=180)
        if "topics create" in line:
            assert f"{unique_topic_prefix}examples\t6 partitions\tcreated" in out, out
    out = sh.run("adstream features apply", timeout=300)
    assert "online store: redis" in out, out
    assert not (work / ".adstream" / "broker").exists()  # nothing embedded was started
