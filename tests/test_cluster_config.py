"""cluster.yaml is a valid Ray cluster-launcher config and keeps its security properties.

Validation is Ray's own, offline: ``prepare_config`` (merge with the provider's defaults.yaml,
merge setup commands, fill per-type worker limits) followed by ``validate_config`` (the JSON
schema ``ray/autoscaler/ray-schema.json`` plus Ray's cross-field checks), the same two calls
``ray up`` makes in ``_bootstrap_config`` before it contacts AWS. The AWS-specific bootstrap
(key pair, security group, IAM, subnets) needs credentials and the network and is not run here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# Instance type -> (GPUs per node, Ray accelerator type), from the AWS instance specs.
GPU_INSTANCES = {
    "g5.xlarge": (1, "A10G"),
    "p4d.24xlarge": (8, "A100"),
    "p5.48xlarge": (8, "H100"),
}
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture()
def raw(text) -> dict:
    return yaml.safe_load(text)


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before touching the cloud provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _start_commands(cfg: dict, key: str) -> list[str]:
    cmds = [c for c in cfg[key] if re.search(r"\bray start\b", c)]
    assert cmds, f"no `ray start` in {key}"
    return cmds


# --------------------------------------------------------------------------------------------
# Ray's validation
# --------------------------------------------------------------------------------------------
def test_ray_validates_the_config(raw):
    prepared = ray_validate(raw)
    assert prepared["cluster_name"] == "sweeper"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_raw_file_matches_ray_schema_before_defaults(raw):
    """The file on its own (not only after Ray fills in defaults) satisfies the schema."""
    import json
    import os

    import ray.autoscaler

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(raw, json.loads(schema_path.read_text()))


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda c: c.__setitem__("idle_timeout_minute", c.pop("idle_timeout_minutes")), "misspelled top-level key"),
        (lambda c: c.__setitem__("worker_start_commands", c.pop("worker_start_ray_commands")), "misspelled command list"),
        (lambda c: c["available_node_types"]["a10g-1x"].__setitem__("min_worker", 0), "misspelled node-type key"),
        (lambda c: c["available_node_types"]["h100-8x"]["resources"].__setitem__("GPU", "8"), "GPU count as a string"),
        (lambda c: c.__setitem__("max_workers", "10"), "max_workers as a string"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_broken_copies_fail_ray_validation(raw, mutate, what):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(broken)


def test_misspelled_top_level_key_in_the_file_text_fails(text, tmp_path):
    """The negative test on a real file copy, the way `ray up` would read it."""
    broken = tmp_path / "cluster.yaml"
    broken.write_text(text.replace("\nidle_timeout_minutes:", "\nidle_timout_minutes:", 1))
    assert broken.read_text() != text
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        ray_validate(yaml.safe_load(broken.read_text()))


def test_head_min_workers_above_global_max_fails(raw):
    """Ray's cross-field checks run too, not only the schema."""
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["a10g-1x"]["min_workers"] = 11
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(broken)


# --------------------------------------------------------------------------------------------
# Security properties
# --------------------------------------------------------------------------------------------
def test_dashboard_bound_to_localhost(raw, text):
    head = _start_commands(raw, "head_start_ray_commands")
    assert len(head) == 1
    assert "--head" in head[0]
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head[0])
    assert hosts == ["127.0.0.1"]
    # no other binding anywhere in a command, and no wildcard address in the file's data
    for key in COMMAND_LISTS:
        for cmd in raw.get(key, []):
            assert "0.0.0.0" not in cmd
            for host in re.findall(r"--dashboard-host[= ](\S+)", cmd):
                assert host == "127.0.0.1"
    data_lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not any("0.0.0.0" in ln for ln in data_lines)


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_token_auth_enabled_in_start_commands(raw, key):
    for cmd in _start_commands(raw, key):
        # RAY_AUTH_MODE=token in the environment of the `ray start` process itself
        assert re.search(r"(^|[;&|]\s*|\s)RAY_AUTH_MODE=token ray start\b", cmd), cmd
        # and a node never starts without the token file
        assert "test -s ~/.ray/auth_token" in cmd
        assert cmd.index("test -s ~/.ray/auth_token") < cmd.index("ray start")
    for other in raw[key]:
        assert "RAY_AUTH_MODE=disabled" not in other


def test_token_reaches_every_node_from_outside_the_repo(raw):
    mounts = raw["file_mounts"]
    assert "~/.ray/auth_token" in mounts  # where Ray looks on the node by default
    local = mounts["~/.ray/auth_token"]
    # Local source is a file under the user's home, not inside the synced checkout ("."), so
    # the token is never part of the code rsync, and never in this file.
    assert local.startswith("~/") and not local.startswith("~/sweeper")
    assert mounts["~/sweeper"] == "."
    # interactive shells (ray attach / ray submit) also run in token mode
    assert any("export RAY_AUTH_MODE=token" in c for c in raw["setup_commands"])
    assert any("chmod 600 ~/.ray/auth_token" in c for c in raw["setup_commands"])


def test_no_literal_token_in_the_file(raw, text):
    # Ray's tokens are secrets.token_hex(32): 64 hex characters. Nothing token-shaped at all.
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)
    assert not re.search(r"[A-Za-z0-9+=]{40,}", text)
    # RAY_AUTH_TOKEN is only ever referenced as a variable, never assigned a value
    for m in re.finditer(r"RAY_AUTH_TOKEN\s*[=:]\s*(\S*)", text):
        assert m.group(1) in ("...", "") or m.group(1).startswith(("$", '"$')), m.group(0)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                assert "RAY_AUTH_TOKEN" not in str(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            assert not re.search(r"RAY_AUTH_TOKEN=[^$\s]", node), node

    walk(raw)


def test_no_security_group_rules_opening_ports(raw, text):
    sg = raw["provider"].get("security_group", {})
    assert not sg.get("IpPermissions"), "cluster.yaml must not open extra ports"
    assert "IpPermissions" not in [ln.strip().split(":")[0] for ln in text.splitlines() if not ln.lstrip().startswith("#")]


def test_nodes_require_imdsv2_and_encrypt_disks(raw):
    for name, nt in raw["available_node_types"].items():
        nc = nt["node_config"]
        assert nc.get("MetadataOptions", {}).get("HttpTokens") == "required", name
        for bdm in nc.get("BlockDeviceMappings", []):
            assert bdm["Ebs"].get("Encrypted") is True, name


# --------------------------------------------------------------------------------------------
# Node types
# --------------------------------------------------------------------------------------------
def test_head_runs_no_trials(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_node_types_declare_gpu_resources(raw):
    by_instance = {}
    for name, nt in raw["available_node_types"].items():
        itype = nt["node_config"]["InstanceType"]
        family = itype.split(".")[0]
        is_gpu = family[0] in "gp" and family[1:2].isdigit()
        res = nt["resources"]
        if is_gpu:
            assert itype in GPU_INSTANCES, f"{name}: unknown GPU instance {itype}"
            gpus, acc = GPU_INSTANCES[itype]
            assert res.get("GPU") == gpus, name
            assert res.get(f"accelerator_type:{acc}") == 1, name
            assert res.get("CPU", 0) > 0, name
            by_instance[itype] = name
        else:
            assert "GPU" not in res, name
            assert not any(k.startswith("accelerator_type:") for k in res), name
    assert set(by_instance) == set(GPU_INSTANCES)  # g5.xlarge, p4d.24xlarge, p5.48xlarge


def test_workers_autoscale_from_zero_within_the_global_cap(raw):
    prepared = ray_validate(raw)
    assert isinstance(raw["max_workers"], int) and raw["max_workers"] > 0
    assert raw["idle_timeout_minutes"] > 0
    for name, nt in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        assert nt["min_workers"] == 0, name
        assert isinstance(nt["max_workers"], int) and nt["max_workers"] >= 1, name
    assert prepared["available_node_types"][raw["head_node_type"]]["max_workers"] == 0


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------
def test_setup_installs_the_project_and_matching_ray(raw):
    setup = raw["setup_commands"]
    assert any(c.strip() == "pip install -e ~/sweeper" for c in setup)
    pins = [m.group(1) for c in setup for m in [re.search(r'ray\[[^\]]*\]==([0-9][^"\s]*)', c)] if m]
    assert pins == [ray.__version__], (
        f"cluster.yaml installs Ray {pins} on the nodes but this machine has Ray {ray.__version__}; "
        "keep them equal"
    )
    # the project is installed after the checkout is copied and after Ray is pinned
    i_ray = next(i for i, c in enumerate(setup) if "ray[" in c)
    i_proj = next(i for i, c in enumerate(setup) if "pip install -e ~/sweeper" in c)
    assert i_ray < i_proj


def test_deepspeed_on_gpu_workers_only_with_the_pyproject_pin(raw):
    pyproject = (REPO / "pyproject.toml").read_text()
    m = re.search(r'gpu\s*=\s*\[\s*"(deepspeed[^"]*)"', pyproject)
    assert m, "pyproject.toml has no gpu extra with deepspeed"
    assert f'pip install "{m.group(1)}"' in raw["worker_setup_commands"]
    assert not any("deepspeed" in c for c in raw["setup_commands"] + raw["head_setup_commands"])
    prepared = ray_validate(raw)
    # the CPU worker type replaces the merged worker commands with the common setup only
    for name, nt in raw["available_node_types"].items():
        if "GPU" in nt["resources"] or name == raw["head_node_type"]:
            assert "worker_setup_commands" not in nt, name  # gets setup + deepspeed
        else:
            assert nt["worker_setup_commands"] == raw["setup_commands"], name
    assert prepared["worker_setup_commands"][-1] == f'pip install "{m.group(1)}"'


def test_head_has_boto3_for_the_autoscaler(raw):
    assert any("boto3" in c for c in raw["head_setup_commands"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(raw):
    prepared = ray_validate(raw)
    cmds = [c for key in COMMAND_LISTS for c in prepared.get(key, [])]
    cmds += [c for nt in raw["available_node_types"].values() for c in nt.get("worker_setup_commands", [])]
    assert cmds
    for cmd in cmds:
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd!r}: {r.stderr}"


def test_every_section_is_commented(text):
    """Each top-level key has a comment right above it (or inline) saying why."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if not (j >= 0 and lines[j].lstrip().startswith("#")) and "#" not in line:
                missing.append(line.split(":")[0])
    assert missing == [], f"top-level sections without a comment: {missing}"
