import re

import pytest

from flm_dist.config import ConfigError, JobConfig, load_job


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_required_keys_exist_with_their_names(tmp_path):
    p = write(
        tmp_path,
        """
task: ctr
init_from: s3://b/runs/pre
data: {pretrain: s3://b/pre, train: s3://b/train, eval: s3://b/eval}
run: {storage: s3://b/runs, name: x}
scaling: {num_workers: 3}
""",
    )
    job = load_job(p)
    assert (job.task, job.init_from, job.run.name, job.scaling.num_workers) == ("ctr", "s3://b/runs/pre", "x", 3)
    assert (job.data.pretrain, job.data.train, job.data.eval, job.run.storage) == ("s3://b/pre", "s3://b/train", "s3://b/eval", "s3://b/runs")


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "data:\n  tarin: s3://x\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    msg = str(e.value)
    assert str(p) in msg and "data.tarin" in msg and "did you mean 'data.train'" in msg


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "scaling:\n  num_workers: two\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    assert str(p) in str(e.value) and "scaling.num_workers" in str(e.value) and "'two'" in str(e.value)


def test_bad_enum_value(tmp_path):
    p = write(tmp_path, "task: clicks\n")
    with pytest.raises(ConfigError, match="key 'task' expects 'pretrain' \\| 'ctr'"):
        load_job(p)


def test_set_overrides_are_typed_and_checked(tmp_path):
    p = write(tmp_path, "task: pretrain\n")
    job = load_job(p, ["scaling.num_workers=4", "train.lr=0.01", "data.features=[{name: a, side: user}]"])
    assert job.scaling.num_workers == 4 and job.train.lr == 0.01 and job.data.features[0].name == "a"
    # YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it means
    assert load_job(p, ["train.lr=1e-3"]).train.lr == 0.001
    with pytest.raises(ConfigError, match="key 'train.lr' expects float"):
        load_job(p, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="with --set overrides.*unknown key 'train.lrr'"):
        load_job(p, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_job(p, ["train.lr"])


def test_value_checks_say_the_fix(tmp_path):
    p = write(tmp_path, "scaling:\n  num_workers: [3, 1]\n")
    with pytest.raises(ConfigError, match=r"\[min, max\]"):
        load_job(p)
    p = write(tmp_path, "data:\n  features: [{name: label, side: user}]\n")
    with pytest.raises(ConfigError, match="reserved"):
        load_job(p)


def test_elastic_workers_and_defaults():
    job = load_job(None, ["scaling.num_workers=[1, 4]"])
    assert job.scaling.max_workers == 4
    assert JobConfig().scaling.cpus_per_worker == "auto"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    p = write(tmp_path, "a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(p)


def test_shipped_jobs_load_and_would_run():
    import pathlib

    files = sorted(pathlib.Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))
    assert len(files) >= 7, files
    for f in files:
        job = load_job(f)
        if not job.train_data:  # the demo fills its data in; a user sets theirs
            job = load_job(f, ["data.pretrain=s3://b/p", "data.train=s3://b/t"])
        job.check_runnable(str(f))


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last copy: the first `data:` section, batch size and all, would vanish
    p = write(tmp_path, "data:\n  batch_size: 1024\ntrain:\n  epochs: 3\ndata:\n  pretrain: s3://b/x\n")
    with pytest.raises(ConfigError, match=r"job.yaml.*'data' appears twice \(first on line 1\)"):
        load_job(p)
    p = write(tmp_path, "train:\n  epochs: 3\n  lr: 0.01\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"'epochs' appears twice \(first on line 2\)"):
        load_job(p)
    # a merge key's values may be overridden in the mapping that merges them
    p = write(tmp_path, "base: &b {epochs: 3, lr: 0.01}\ntrain:\n  <<: *b\n  epochs: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # parsed, then refused as a job key
        load_job(p)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=-1", "train.max_steps"),
        ("train.log_every=0", "train.log_every"),
        ("train.num_negatives=-5", "train.num_negatives"),
        ("train.sparse_lr=-0.05", "train.sparse_lr"),
        ("train.lr=-0.001", "train.lr"),
        ("train.temperature=.nan", "train.temperature"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
        ("scaling.max_failures=-2", "scaling.max_failures"),
        ("model.hidden=[128, 0]", "model.hidden"),
        ("model.noise_std=-0.1", "model.noise_std"),
        ("data.features=[{name: tags, side: item, kind: multi, max_len: 0}]", "data.features[tags].max_len"),
        ("data.features=[{name: tags, side: item, rows: -5}]", "data.features[tags].rows"),
        ("run.name=..", "run.name"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_job(None, [override])


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_an_interaction_loss_without_negatives_is_refused(task):
    job = load_job(None, [f"task={task}", "train.num_negatives=0", "data.pretrain=s3://b/x", "data.train=s3://b/y"])
    with pytest.raises(ConfigError, match="both 0"):
        job.check_runnable()
    load_job(None, [f"task={task}", "train.num_negatives=0", "train.uniform_negatives=256", "data.pretrain=s3://b/x", "data.train=s3://b/y"]).check_runnable()


def test_a_split_that_would_be_ignored_is_refused():
    """With data.eval set the split was silently replaced by none; a time cutoff without
    by: time was silently unused."""
    base = ["task=retrieval", "data.train=s3://b/t"]
    with pytest.raises(ConfigError, match="data.split.by=last .* data.eval is set"):
        load_job(None, [*base, "data.split.by=last", "data.eval=s3://b/e"]).check_runnable()
    with pytest.raises(ConfigError, match="time_cutoff applies to data.split.by: time"):
        load_job(None, [*base, "data.split.by=random", "data.split.time_cutoff=5"]).check_runnable()
    load_job(None, [*base, "data.eval=s3://b/e"]).check_runnable()
    load_job(None, [*base, "data.split.by=time", "data.split.time_cutoff=5"]).check_runnable()


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "s3://b/run", "--set", "data.eval=s3://b/e"],
        ["export", "--checkpoint", "s3://b/run", "--out", "s3://b/x", "--set", "model.item_rows=8"],
        ["data", "convert", "--format", "csv", "in.csv", "out", "--set", "data.batch_size=8"],
    ],
    ids=["evaluate", "export", "convert"],
)
def test_a_set_a_command_would_not_read_is_refused(argv, capsys):
    """evaluate and export take the job from the checkpoint: `--set data.eval=...` was
    silently dropped (evaluate's data is --data)."""
    from flm_dist.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--set {argv[-1].split('=')[0]}" in err and "reads only storage.*" in err


def test_local_paths_are_made_absolute_uris_are_not(tmp_path, monkeypatch):
    """Ray Train's workers and Ray Serve's replicas run in folders of their own: a
    relative path (the default run.storage, ./runs, too) named a different place in each
    process, and a run's workers committed where its driver never looked."""
    from flm_dist.cli import _absolute_args, build_parser

    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, "task: ctr\ninit_from: runs/pre\ndata: {train: log/train, eval: s3://b/eval, valid: file:///v}\n")
    job = load_job(p)
    assert (job.init_from, job.data.train, job.run.storage) == (str(tmp_path / "runs/pre"), str(tmp_path / "log/train"), str(tmp_path / "runs"))
    assert (job.data.eval, job.data.valid, job.data.pretrain) == ("s3://b/eval", "file:///v", "")
    args = _absolute_args(build_parser().parse_args(["evaluate", "--checkpoint", "runs/ft", "--data", "s3://b/eval", "--reference", "ref"]))
    assert (args.checkpoint, args.data, args.reference) == (str(tmp_path / "runs/ft"), "s3://b/eval", str(tmp_path / "ref"))
    assert _absolute_args(build_parser().parse_args(["serve", "exp"])).export == str(tmp_path / "exp")
    # a job submitted to a cluster is checked here and read there: its paths stay as written
    from flm_dist.submit import Submission, local_paths

    sub = Submission(p, ("data.eval=ev",)).load()
    assert (sub.init_from, sub.data.train, sub.run.storage) == ("runs/pre", "log/train", "./runs")
    assert "run.storage=./runs" in local_paths(sub) and "data.eval=ev" in local_paths(sub)
