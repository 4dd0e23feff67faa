"""Two `infercept serve` instances behind nginx with session affinity (examples/router/nginx.conf).

The README's configuration, run as written but on free ports: each instance
names itself (`--intercept-instance`), its intercept ids carry the name, and
nginx sends a URL that names an intercept to its instance and every other
request by the client's `X-Session-Id`. Agents on the official `openai` client
(the header set once per client) get every follow-up resumed where its turn
paused. nginx comes from the system (scripts/setup.sh installs Debian's
nginx-light where it is missing).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from server.conftest import STOP_TIMEOUT_S, TINY_SERVER_ARGS, ServerProcess, free_port, server_env

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "router" / "nginx.conf"
INSTANCES = ("a", "b")
TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}
MIN_AGENTS, MAX_AGENTS = 6, 30


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if found is None:
        pytest.fail("nginx not found: scripts/setup.sh installs it (Debian's nginx-light)")
    return found


@pytest.fixture(scope="module")
def routed(server_pool, tiny_model, tmp_path_factory):
    """Instances a and b (one core each) and nginx in front: yields nginx's URL and the instances."""
    server_pool.close()  # two cores: the pool's server makes way for these two
    tmp = tmp_path_factory.mktemp("router")
    servers = {}
    for core, name in enumerate(INSTANCES):
        env = {**server_env(), "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        servers[name] = ServerProcess([str(tiny_model), *TINY_SERVER_ARGS, "--intercept-instance", name],
                                      tmp / f"server-{name}.log", env=env)
    for server in servers.values():
        server.start()
    port = free_port()
    config = CONFIG.read_text()
    config = config.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    config = config.replace("127.0.0.1:8001", f"127.0.0.1:{servers['a'].port}")
    config = config.replace("127.0.0.1:8002", f"127.0.0.1:{servers['b'].port}")
    (tmp / "tmp").mkdir()
    (tmp / "nginx.conf").write_text(config)
    log = open(tmp / "nginx.log", "wb")
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                              "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline_s = time.monotonic() + 60
        while True:
            assert nginx.poll() is None, (tmp / "nginx.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline_s, (tmp / "nginx.log").read_text()
            time.sleep(0.2)
        yield url, servers
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            nginx.kill()
        log.close()
        for server in servers.values():
            server.stop()


def agent(url, model, index):
    """A chat agent on its own `openai` client, its session in a default header."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=120,
                           default_headers={"X-Session-Id": f"agent-{index}"})
    messages = [{"role": "user", "content": f"Agent {index}: what is 2+3? Use the calculator."}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=80, extra_body=FORCE_CALL)
    first = raw.parse()
    info = first.model_extra["infercept"]
    call = first.choices[0].message.tool_calls[0].model_dump()
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                            temperature=0, max_tokens=16)
    return info, raw.headers, answer.model_extra["infercept"]


def test_every_follow_up_resumes_on_the_instance_that_paused_it(routed, tiny_model):
    url, _ = routed
    instances, index = set(), 0
    # Until both instances had agents (the hash ring depends on the ports): at least
    # MIN_AGENTS, at most MAX_AGENTS (all on one instance: a chance of 2 in 2^MAX_AGENTS).
    while index < MIN_AGENTS or (instances != set(INSTANCES) and index < MAX_AGENTS):
        index += 1
        info, headers, resumed = agent(url, str(tiny_model), index)
        instance = headers["X-InferCept-Instance"]
        assert info["intercept_id"].startswith(f"icpt-{instance}.")
        assert headers["X-InferCept-Intercept-Id"] == info["intercept_id"]
        assert resumed["resumed_from"] == info["intercept_id"] and resumed["reused_tokens"] > 0
        instances.add(instance)
    assert instances == set(INSTANCES)  # the sessions were spread over both


def test_a_url_naming_an_intercept_reaches_its_instance(routed, tiny_model):
    url, servers = routed
    for name, server in servers.items():
        # Paused on one instance directly; resumed through nginx with no session header.
        paused = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
            "model": str(tiny_model), "prompt": "The quick brown fox", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "infercept": {"intercept_after": 5}}).json()
        intercept_id = paused["infercept"]["intercept_id"]
        assert intercept_id.startswith(f"icpt-{name}.")
        assert httpx.get(f"{url}/v1/intercepts/{intercept_id}", timeout=30).json()["state"] == "preserved"
        resumed = httpx.post(f"{url}/v1/intercepts/{intercept_id}/resume", json={"text": " = 42"},
                             timeout=120).json()
        assert resumed["infercept"]["resumed_from"] == intercept_id
        assert resumed["infercept"]["reused_tokens"] > 0
