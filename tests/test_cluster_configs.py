"""The cluster configs under ``cluster/configs`` hold together: their ``sslrun launch`` commands are what the real CLI
builds and plans, the machines they ask for hold the workers those commands place, data and runs live in object
storage (no shared disk), and the KubeRay NetworkPolicy matches the pods of the RayJob it protects.

No cloud is reached: the AWS node configs are checked against EC2's own request schema (botocore's service model,
offline) and the commands against sslrun's planner; a real S3 server on loopback and simulated Ray nodes test the
storage paths themselves (``tests/test_storage.py``, ``tests/test_run_storage.py``, ``tests/test_elastic.py``).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.cluster.plan import LaunchPlan, plan_launch
from sslrun.core.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
DOCS = ROOT / "docs" / "cluster.md"

# AWS's published shape of the instance types the AWS config uses: (GPUs, vCPUs). A new instance type in the
# config needs its line here, so that the commands are checked against what the nodes really have.
INSTANCE_TYPES = {"g5.12xlarge": (4, 48), "m5.2xlarge": (0, 8)}


# ---- helpers -------------------------------------------------------------------------------------------------
def _header_commands(path: Path) -> list[list[str]]:
    """The arguments after ``sslrun launch`` of every command in a config file's leading comment block (a command
    runs on while its lines end with a backslash)."""
    header: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    return _commands("\n".join(header))


def _commands(text: str) -> list[list[str]]:
    """The arguments after ``sslrun launch`` of every shell command in ``text`` that runs it."""
    found, current = [], ""
    for line in text.splitlines():
        if current or line.strip().startswith(("sslrun launch ", "ray job submit ")):
            current += line.rstrip("\\") + " "
            if not line.rstrip().endswith("\\"):
                found.append(current)
                current = ""
    return [_launch_args(c) for c in found if "sslrun launch" in c]


def _launch_args(command: str) -> list[str]:
    words = shlex.split(command)
    i = words.index("sslrun")
    assert words[i + 1] == "launch", command
    return words[i + 2 :]


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _launch_config(args: list[str], monkeypatch: pytest.MonkeyPatch) -> ExperimentConfig:
    """The experiment the real ``sslrun launch`` builds from ``args`` (its parser, its flags, its validation), caught
    where it would be handed to the launcher."""
    import sslrun.cluster.launcher

    seen: list[ExperimentConfig] = []

    def capture(cfg: ExperimentConfig, **_: Any) -> None:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(sslrun.cluster.launcher, "launch", capture)
    result = CliRunner().invoke(app, ["launch", *args])
    assert seen, f"sslrun launch {shlex.join(args)} was refused:\n{result.output}"
    return seen[0]


def _cluster_plan(cfg: ExperimentConfig) -> LaunchPlan:
    """The layout on a cluster (``--address``): refuses a global batch that some size of the range cannot split."""
    return plan_launch(cfg, embedded=False, local_cpus=0, local_gpus=0)


def _rayjob() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay-rayjob.yaml").read_text()))
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def _docs_code(title: str) -> str:
    """The code blocks of one ``## `` section of docs/cluster.md, found by the start of its title."""
    text = DOCS.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return "\n".join(text[start : end if end > 0 else None].split("```")[1::2])


# ---- AWS -----------------------------------------------------------------------------------------------------
def test_aws_runs_keep_data_and_checkpoints_in_s3_and_fit_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    text = (CONFIGS / "aws-gpu.yaml").read_text()
    assert "/mnt/shared" not in text and "nfs" not in text.lower() and "efs" not in text.lower()
    assert not re.search(r"YOUR-(?!BUCKET)", text), "the only placeholder left is the bucket, in the commands"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    commands = _header_commands(CONFIGS / "aws-gpu.yaml")
    assert len(commands) == 2  # a fixed-size run and an elastic one
    for args in commands:
        cfg = _launch_config(args, monkeypatch)
        plan = _cluster_plan(cfg)
        assert cfg.data.data_dir.startswith("s3://YOUR-BUCKET/") and cfg.cluster.storage_path.startswith("s3://")
        assert str(cfg.output).startswith("/home/ray/"), "--output is the node's working copy, not a shared path"
        for node_type in workers.values():  # every worker node holds its share of the workers
            gpus, vcpus = INSTANCE_TYPES[node_type["node_config"]["InstanceType"]]
            share = {k: v * plan.workers_per_node for k, v in plan.resources_per_worker.items()}
            assert share.get("GPU", 0) == gpus and share["CPU"] <= vcpus, (node_type, share)
        if plan.elastic:
            # the autoscaler can bring up the range's top, and the on-demand nodes alone hold its bottom
            assert plan.nodes == config["max_workers"] == sum(t["max_workers"] for t in workers.values())
            on_demand = [t for t in workers.values() if "InstanceMarketOptions" not in t["node_config"]]
            assert plan.min_workers // plan.workers_per_node <= sum(t["min_workers"] for t in on_demand)
        else:
            assert plan.nodes == sum(t["min_workers"] for t in workers.values()), "a fixed run finds its nodes up"


def test_aws_spot_workers_are_an_optional_type_of_the_same_shape() -> None:
    types = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())["available_node_types"]
    spot = {k: t for k, t in types.items() if t["node_config"].get("InstanceMarketOptions")}
    assert list(spot) == ["ray.worker.gpu-spot"]
    node = spot["ray.worker.gpu-spot"]
    assert node["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert node["min_workers"] == 0, "spot nodes start only when a run asks for more than the on-demand nodes"
    # every GPU node has the same shape, so every whole-node size of an elastic range splits the batch alike
    assert node["node_config"]["InstanceType"] == types["ray.worker.gpu"]["node_config"]["InstanceType"]


def test_aws_node_configs_are_valid_ec2_requests_with_an_instance_profile_on_every_node() -> None:
    """Ray passes each node_config to EC2's RunInstances as is: check it against EC2's request schema (botocore's
    bundled service model; no network), as boto3 would before sending it. The head needs a profile too: its driver
    publishes the dataset and the stop flag to the bucket."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    types = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())["available_node_types"]
    for name, node_type in types.items():
        request = {"MinCount": 1, "MaxCount": 1, **node_type["node_config"]}
        report = ParamValidator().validate(request, model.input_shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert node_type["node_config"]["IamInstanceProfile"].get("Name"), f"{name} has no instance profile"
    # the checker does catch a misspelt field or a wrong value type
    for bad in ({"InstanceMarketOption": {"MarketType": "spot"}}, {"IamInstanceProfile": "sslrun-s3"}):
        assert ParamValidator().validate({"MinCount": 1, "MaxCount": 1, **bad}, model.input_shape).has_errors()


# ---- KubeRay -------------------------------------------------------------------------------------------------
def test_the_rayjob_needs_no_shared_volume_and_reads_the_bucket_with_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay-rayjob.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["RayJob"], "no PersistentVolumeClaim: data and runs are in the bucket"
    job = _rayjob()
    args = _launch_args(job["spec"]["entrypoint"])
    assert "/mnt/shared" not in job["spec"]["entrypoint"]
    cfg = _launch_config(args, monkeypatch)
    plan = _cluster_plan(cfg)
    assert cfg.data.data_dir.startswith("s3://") and cfg.cluster.storage_path.startswith("s3://")
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert group["replicas"] == group["minReplicas"] == plan.nodes
    # each worker pod holds its node's share of the workers
    limits = worker["containers"][0]["resources"]["limits"]
    share = {k: v * plan.workers_per_node for k, v in plan.resources_per_worker.items()}
    assert int(limits["nvidia.com/gpu"]) == share["GPU"] and int(limits["cpu"]) >= share["CPU"]
    for pod in (head, worker):
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
        container = pod["containers"][0]
        # the driver (head) and the workers reach the bucket: credentials from the same Secret
        assert container["envFrom"] == [{"secretRef": {"name": "sslrun-s3"}}]
        # the node-local copy of the data goes to a volume of the pod, not the container's writable layer
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (cache,) = [n for n, path in mounts.items() if env["SSLRUN_STAGE_DIR"].startswith(path + "/")]
        assert "emptyDir" in volumes[cache]
    assert "envFrom" not in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0], "it never reads the bucket"


def test_the_networkpolicy_covers_every_pod_of_the_rayjob() -> None:
    job = _rayjob()
    policies = list(yaml.safe_load_all((CONFIGS / "kuberay-networkpolicy.yaml").read_text()))
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    spec = job["spec"]["rayClusterSpec"]
    pods = {
        "head": spec["headGroupSpec"]["template"],
        "submitter": job["spec"]["submitterPodTemplate"],
        **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]},
    }
    job_wide, operator = policies
    selector = job_wide["spec"]["podSelector"]["matchLabels"]
    for name, pod in pods.items():
        labels = pod["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"the {name} pod is not covered by the policy"
    # ingress from the job's own pods only, on every port
    assert job_wide["spec"]["policyTypes"] == ["Ingress"]
    assert job_wide["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    # the operator reaches the head's dashboard, nothing else
    head = operator["spec"]["podSelector"]["matchLabels"]
    assert head.items() <= pods["head"]["metadata"]["labels"].items()
    assert not any(head.items() <= p["metadata"]["labels"].items() for n, p in pods.items() if n != "head")
    (rule,) = operator["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert (
        job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
        == (spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"])
    )


# ---- the docs ------------------------------------------------------------------------------------------------
def test_the_docs_run_the_commands_the_configs_hold() -> None:
    """Sections 3 and 4 of docs/cluster.md show the configs' own commands (plus --resume), with no shared path."""
    aws = _docs_code("3. ")
    aws_commands = _commands(aws)
    header = _header_commands(CONFIGS / "aws-gpu.yaml")
    assert aws_commands and all(a in header or a[:-1] in header and a[-1] == "--resume" for a in aws_commands)
    assert all(a in aws_commands for a in header), "every command of the AWS config is in section 3"
    kuberay = _docs_code("4. ")
    entrypoint = _launch_args(_rayjob()["spec"]["entrypoint"])
    assert entrypoint in _commands(kuberay)
    for section in (aws, kuberay):
        assert "/mnt/shared" not in section


def test_the_iam_policies_of_section_3_are_well_formed() -> None:
    """The policy documents the AWS walkthrough writes are JSON, the bucket's grants cover what sslrun does there
    (publish and read data, write and prune checkpoints, remove the stop flag), and the head may hand the workers'
    role to the instances it starts."""
    code = _docs_code("3. ")
    heredocs = re.findall(r"<<'?JSON'?\n(.*?)\n\s*JSON\n", code, flags=re.S)
    inline = re.findall(r"'(\{\"Version\".*?\})'", code)
    policies = [json.loads(p.replace("$BUCKET", "my-bucket")) for p in heredocs + inline]
    assert len(policies) == 3
    trust, bucket, pass_role = policies
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    grants = {a: s["Resource"] for s in bucket["Statement"] for a in s["Action"]}
    assert grants["s3:ListBucket"] == "arn:aws:s3:::my-bucket"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert grants[action] == "arn:aws:s3:::my-bucket/*"
    assert pass_role["Statement"][0]["Action"] == "iam:PassRole"
    assert pass_role["Statement"][0]["Resource"].endswith(":role/sslrun-s3")
    # the loop that creates the roles and profiles makes exactly the profiles the YAML names
    types = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())["available_node_types"]
    (created,) = re.findall(r"for name in ([\w -]+); do", code)
    assert set(created.split()) == {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()}
