"""The pure Job builder and the status mapping, without any server."""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from support.crd_schema import problems, with_defaults
from support.k8s_names import job_with_server_labels, object_problems
from modelpress.contract import GPU_IMAGE_SETTING, PERMANENT_EXIT_CODES, ROLES, S3_KEYS, S3_REQUIRED_KEYS, Env
from modelpress.operator.config import OperatorConfig
from modelpress.operator.job_builder import CA_MOUNTS, OUTCOME_FINALIZER, build_claim, build_job, job_name, label_value
from modelpress.operator.status import Observation, parse_progress, set_condition, status_patch, succeeded_condition
from modelpress.operator.validation import SpecRejected, parse


def cr(spec: dict[str, Any], name: str = "job", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                          "metadata": {"name": name, "namespace": "ml", "uid": "u-1", **({"labels": labels} if labels else {})},
                          "spec": spec})


BASE = {"model": {"uri": "s3://base/llama", "connection": "src-s3"},
        "recipe": {"preset": "W8A8", "algorithm": "RTN"},
        "calibration": {"dataset": "s3://data/calib.jsonl", "connection": "data-s3"},
        "output": {"uri": "s3://models/llama-w8a8", "connection": "dst-s3"}}


def build(spec: dict[str, Any], config: OperatorConfig = OperatorConfig()) -> dict[str, Any]:
    body = cr(spec)
    return build_job(body, parse(body), config)


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_connections_get_one_prefix_per_role_and_never_clash() -> None:
    env = env_of(build(BASE))
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs["MODEL_AWS_S3_ENDPOINT"] == {"name": "src-s3", "key": "AWS_S3_ENDPOINT"}
    assert refs["DATA_AWS_ACCESS_KEY_ID"] == {"name": "data-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["OUTPUT_AWS_SECRET_ACCESS_KEY"] == {"name": "dst-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert refs["OUTPUT_AWS_DEFAULT_REGION"]["optional"] is True and "optional" not in refs["OUTPUT_AWS_S3_ENDPOINT"]
    # a CA path in a Secret names nothing the pod has: the pod's bundle is the cluster's, mounted
    assert not any(name.endswith("AWS_CA_BUNDLE") for name in refs)
    for role in ROLES:  # every key the runner reads, for every role; only the required ones must exist
        assert {name: ref["key"] for name, ref in refs.items() if name.startswith(role.prefix)} == {role.prefix + k: k for k in S3_KEYS}
        required = {ref["key"] for name, ref in refs.items() if name.startswith(role.prefix) and not ref.get("optional")}
        assert required == set(S3_REQUIRED_KEYS)
    names = [e["name"] for e in build(BASE)["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)) and "AWS_ACCESS_KEY_ID" not in names


def test_cpu_job_has_no_gpu_and_scratch_holds_every_cache() -> None:
    job = build(BASE)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}
    assert "tolerations" not in pod
    env = env_of(job)
    for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[name]["value"].startswith("/scratch/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert volumes["scratch"] == {"name": "scratch", "persistentVolumeClaim": {"claimName": "job-scratch"}}
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert Env.GPUS not in env and pod["containers"][0]["image"] == OperatorConfig().runner_image


def test_the_scratch_claim_is_the_jobs_own_sized_by_the_spec() -> None:
    body = cr(BASE)
    claim = build_claim(body, parse(body), OperatorConfig())
    assert claim["metadata"]["name"] == "job-scratch" and claim["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}
    assert claim["metadata"]["labels"]["modelpress.dev/compressionjob-uid"] == "u-1"
    configured = OperatorConfig(scratch_storage_class="fast-ssd", scratch_access_mode="ReadWriteOncePod")
    assert build_claim(body, parse(body), configured)["spec"] == {
        "accessModes": ["ReadWriteOncePod"], "resources": {"requests": {"storage": "50Gi"}}, "storageClassName": "fast-ssd"}
    spec = {**BASE, "runtime": {"resources": {"scratch": "200Gi"},
                                "scratchVolume": {"storageClassName": "nfs", "accessMode": "ReadWriteMany"}}}
    body = cr(spec)
    assert build_claim(body, parse(body), configured)["spec"] == {
        "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}}, "storageClassName": "nfs"}


def test_every_pod_is_held_for_its_outcome_and_evictions_never_count() -> None:
    job = build(BASE)
    assert job["spec"]["template"]["metadata"]["finalizers"] == [OUTCOME_FINALIZER]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    # the first matching rule decides: an evicted pod is ignored whatever its exit code
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [int(c) for c in PERMANENT_EXIT_CODES]
    assert 137 not in rules[1]["onExitCodes"]["values"]  # an OOM kill counts against backoffLimit


def test_a_default_deadline_bounds_every_run_unless_the_spec_sets_one() -> None:
    assert build(BASE)["spec"]["activeDeadlineSeconds"] == OperatorConfig().active_deadline_seconds
    assert build(BASE, OperatorConfig(active_deadline_seconds=7200))["spec"]["activeDeadlineSeconds"] == 7200
    assert "activeDeadlineSeconds" not in build(BASE, OperatorConfig(active_deadline_seconds=None))["spec"]
    own = {**BASE, "runtime": {"activeDeadlineSeconds": 600}}
    assert build(own, OperatorConfig(active_deadline_seconds=7200))["spec"]["activeDeadlineSeconds"] == 600


def test_gpu_jobs_run_the_gpu_image_and_tell_the_runner() -> None:
    config = OperatorConfig(runner_image="cpu:1", gpu_runner_image="cuda:1")
    gpu = build({**BASE, "runtime": {"resources": {"gpus": 2}}}, config)
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "cuda:1" and env_of(gpu)[Env.GPUS]["value"] == "2"
    assert build(BASE, config)["spec"]["template"]["spec"]["containers"][0]["image"] == "cpu:1"
    own = build({**BASE, "runtime": {"image": "mine:2", "resources": {"gpus": 1}}}, config)
    assert own["spec"]["template"]["spec"]["containers"][0]["image"] == "mine:2"


def test_settings_come_from_the_environment_and_bad_ones_are_named() -> None:
    config = OperatorConfig.from_env({GPU_IMAGE_SETTING: "cuda:2", "MODELPRESS_SCRATCH_ACCESS_MODE": "ReadWriteMany",
                                      "MODELPRESS_ACTIVE_DEADLINE_SECONDS": "0", "MODELPRESS_STALL_TIMEOUT": "60"})
    assert config.gpu_runner_image == "cuda:2" and config.scratch_access_mode == "ReadWriteMany"
    assert config.active_deadline_seconds is None and config.stall_timeout == 60
    assert OperatorConfig.from_env({}).scratch_volume == "persistentVolumeClaim"
    with pytest.raises(ValueError, match="MODELPRESS_SCRATCH_VOLUME: must be one of persistentVolumeClaim, emptyDir"):
        OperatorConfig.from_env({"MODELPRESS_SCRATCH_VOLUME": "ephemeral"})
    with pytest.raises(ValueError, match="MODELPRESS_SCRATCH_ACCESS_MODE"):
        OperatorConfig.from_env({"MODELPRESS_SCRATCH_ACCESS_MODE": "ReadOnlyMany"})


def test_empty_dir_scratch_asks_for_ephemeral_storage() -> None:
    job = build(BASE, OperatorConfig(scratch_volume="emptyDir"))
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["scratch"] == {"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "50Gi"


def test_scheduling_fields_pass_through_and_a_named_gpu_toleration_is_not_doubled() -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A100"]}]}]}}}
    spec = {**BASE, "runtime": {"resources": {"gpus": 2}, "tolerations": [toleration], "affinity": affinity,
                                "nodeSelector": {"zone": "a"}, "priorityClassName": "batch-low",
                                "serviceAccountName": "runner", "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60}}
    job = build(spec)
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [toleration] and pod["affinity"] == affinity and pod["nodeSelector"] == {"zone": "a"}
    assert pod["priorityClassName"] == "batch-low" and pod["serviceAccountName"] == "runner"
    assert job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["ttlSecondsAfterFinished"] == 60
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_pvcs_recipe_configmap_ca_bundle_and_proxy() -> None:
    spec = {"model": {"uri": "pvc://models/base/llama"}, "recipe": {"configMap": {"name": "recipes", "key": "gptq.yaml"}},
            "calibration": {"dataset": "self-generated"}, "output": {"uri": "pvc://out/llama-gptq"}}
    config = OperatorConfig(proxy_env={"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".svc,.cluster.local"})
    body = cr(spec)
    job = build_job(body, parse(body), config, {"ca-bundle.crt", "odh-ca-bundle.crt"})
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] is True and mounts["/mnt/pvc/out"]["readOnly"] is False
    assert mounts["/etc/pki/tls/certs/odh-trusted-ca-bundle.crt"]["subPath"] == "ca-bundle.crt"
    assert mounts["/etc/ssl/certs/odh-ca-bundle.crt"]["subPath"] == "odh-ca-bundle.crt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["recipe"]["configMap"] == {"name": "recipes", "items": [{"key": "gptq.yaml", "path": "recipe.yaml"}]}
    env = env_of(job)
    assert env["MODELPRESS_RECIPE_FILE"]["value"] == "/etc/modelpress/recipe/recipe.yaml"
    assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128" and env["NO_PROXY"]["value"] == ".svc,.cluster.local"
    assert json.loads(env["MODELPRESS_SPEC"]["value"])["metadata"] == {"name": "job", "namespace": "ml", "uid": "u-1"}


def ca_variables(job: dict[str, Any]) -> set[str]:
    env = env_of(job)
    return {env[name]["value"] for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE")}


def test_with_both_bundles_the_ca_variables_name_one_file_holding_the_custom_cas_too(tmp_path: Path) -> None:
    body = cr(BASE)
    job = build_job(body, parse(body), OperatorConfig(), {"ca-bundle.crt", "odh-ca-bundle.crt"})
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (bundle,) = ca_variables(job)
    assert bundle == f"{init['volumeMounts'][-1]['mountPath']}/ca-bundle.pem"
    assert {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}[init["volumeMounts"][-1]["mountPath"]]
    assert init["securityContext"] == pod["containers"][0]["securityContext"] and init["image"] == pod["containers"][0]["image"]
    # Run the init container's command with its mounts mapped to local files: the bundle holds both.
    cluster, custom = tmp_path / "cluster.pem", tmp_path / "custom.pem"
    cluster.write_text("PUBLIC ROOTS\n")
    custom.write_text("CUSTOM CA\n")
    local = {CA_MOUNTS["ca-bundle.crt"]: str(cluster), CA_MOUNTS["odh-ca-bundle.crt"]: str(custom), bundle: str(tmp_path / "out.pem")}
    command = [local.get(part, part).replace(bundle, local[bundle]) for part in init["command"]]
    subprocess.run(command, check=True)
    assert (tmp_path / "out.pem").read_text() == "PUBLIC ROOTS\nCUSTOM CA\n"


@pytest.mark.parametrize("key", ["ca-bundle.crt", "odh-ca-bundle.crt"])
def test_with_one_bundle_the_ca_variables_name_it(key: str) -> None:
    body = cr(BASE)
    job = build_job(body, parse(body), OperatorConfig(), {key})
    assert ca_variables(job) == {CA_MOUNTS[key]} and "initContainers" not in job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[CA_MOUNTS[key]]["subPath"] == key


def test_without_a_ca_bundle_nothing_points_at_one() -> None:
    env = env_of(build(BASE))
    assert "SSL_CERT_FILE" not in env and "trusted-ca" not in json.dumps(build(BASE))


def test_long_names_are_shortened_deterministically() -> None:
    long = "a" * 60
    assert job_name("tiny") == "tiny-runner"
    assert len(job_name(long)) == 63 and job_name(long) == job_name(long) != job_name(long + "b")
    assert label_value("tiny") == "tiny" and label_value(long + "." * 10 + "b") != label_value(long + "." * 10 + "c")
    assert len(label_value("a" * 253)) == 63


@pytest.mark.parametrize("name", ["a" * 120, "model." * 20 + "x", "m-" * 60 + "z", "a" * 253])
def test_a_name_of_any_length_makes_objects_the_api_server_accepts(name: str) -> None:
    body = cr(BASE, name=name)
    job, claim = build_job(body, parse(body), OperatorConfig()), build_claim(body, parse(body), OperatorConfig())
    stored = job_with_server_labels({**job, "metadata": {**job["metadata"], "uid": "j-1"}})
    assert object_problems(stored) == [] and object_problems(claim) == []
    for made in (job, claim, job["spec"]["template"]):
        assert made["metadata"]["annotations"]["modelpress.dev/compressionjob-name"] == name
    assert job["metadata"]["name"] != claim["metadata"]["name"]


@pytest.mark.parametrize("spec_change, problem", [
    ({"output": {"uri": "/tmp/out"}}, "spec.output.uri: a local path is lost with the pod"),
    ({"output": {"uri": "s3://models/x"}}, "spec.output.connection: s3://models/x needs an S3 connection Secret"),
    ({"output": {"uri": "s3://Bad_Bucket/x", "connection": "dst-s3"}}, "spec.output.uri: 'Bad_Bucket' is not an S3 bucket name"),
    ({"model": {"uri": "hf://not a repo"}}, "spec.model.uri: 'not a repo' is not a hub repository id"),
    ({"recipe": {"preset": "W4A16", "modifiers": {"a": {}}}}, "spec.recipe: give exactly one of preset, modifiers or configMap"),
])
def test_invalid_specs_name_the_field_and_the_fix(spec_change: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecRejected) as err:
        parse(cr({**BASE, **spec_change}))
    assert str(err.value).startswith(problem)


def test_progress_takes_the_last_progress_line_and_keeps_its_time_when_unchanged() -> None:
    line = {"event": "progress", "stage": "calibrate", "layer": 3, "layers": 30, "percent": 10.2, "etaSeconds": 900}
    tail = "\n".join(["not json", json.dumps({**line, "layer": 2}), json.dumps(line), '{"event": "stage"}', "{broken"])
    progress = parse_progress(tail)
    assert progress.layers_done == 3 and progress.percent == 10 and progress.estimated_remaining_seconds == 900
    old = {**progress.model_dump(by_alias=True, exclude_none=True), "lastUpdateTime": "2026-01-01T00:00:00Z"}
    assert parse_progress(tail, old).last_update_time == "2026-01-01T00:00:00Z"
    assert parse_progress(tail.replace('"layer": 3', '"layer": 4'), old).last_update_time != "2026-01-01T00:00:00Z"
    assert parse_progress("no progress here") is None


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], succeeded_condition("Pending", "JobCreated", "", 1))
    first[0]["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    same = set_condition(first, succeeded_condition("Running", "Running", "", 1))
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["reason"] == "Running"
    flipped = set_condition(same, succeeded_condition("Succeeded", "Succeeded", "", 1))
    assert flipped[0]["status"] == "True" and flipped[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"




def test_status_patch_validates_against_the_crd(validator: Any) -> None:
    observation = Observation(phase="Failed", reason="OOMKilled", message="the runner ran out of memory", exit_code=137)
    patch = status_patch({}, 1, observation, None)
    body = {**cr(BASE), "status": patch}
    assert problems(validator, body) == [] and patch["failure"]["exitCode"] == 137
