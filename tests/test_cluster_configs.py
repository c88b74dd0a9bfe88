"""The KubeRay NetworkPolicy matches the pods of the RayJob it protects: every pod of the job carries the label the
policy selects, and the only other way in is the KubeRay operator on the dashboard port."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "configs"


def test_the_networkpolicy_covers_every_pod_of_the_rayjob() -> None:
    (job,) = [d for d in yaml.safe_load_all((CONFIGS / "kuberay-rayjob.yaml").read_text()) if d["kind"] == "RayJob"]
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
