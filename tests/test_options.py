"""One options definition (issue 16): the job schema is generated from FitOptions's fields, a bad
value is reported under the key the user wrote, and a job's options equal the flat ones."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from svi import config
from svi.config import ConfigError, JobConfig, fit_options, load_config
from svi.options import JOB_NAME, FitOptions, OptionsError, specs

#: the documented job defaults (FitOptions docstring, README "Configs and the command line")
JOB_DEFAULTS = {"tracking": True, "resume": "auto", "run_name": JOB_NAME}


def test_every_option_has_one_place_in_the_job_schema_with_the_python_default():
    schema = OmegaConf.structured(JobConfig)
    places = {}
    for s in specs():
        places.setdefault(s.path, []).append(s.name)
        if s.section == "fit":
            assert s.key == s.name and s.key not in schema.fit
            continue
        node = schema if s.section == "job" else schema[s.section]
        assert s.key in node, s.path
        written = OmegaConf.to_container(node, resolve=False)[s.key]
        assert written == JOB_DEFAULTS.get(s.name, getattr(FitOptions(), s.name)), s.path
    assert all(len(names) == 1 for names in places.values()), places
    assert {s.name for s in specs()} == {f.name for f in dataclasses.fields(FitOptions)}
    assert {s.name for s in specs() if s.job_default != s.default} == set(JOB_DEFAULTS)
    generated = {k for sec in ("data", "tracking", "checkpoint") for k in schema[sec]}
    assert generated - {s.key for s in specs()} == {"path", "columns", "make"}  # data-only keys


@pytest.mark.parametrize("path, value, allowed", [
    ("checkpoint.every", "0", "a positive integer"),
    ("tracking.wait", "-1", "a non-negative number of seconds"),
    ("data.prefetch", "0", "a positive integer"),
    ("fit.lr", "-1", "a positive number"),
])
def test_a_bad_value_is_named_as_the_user_wrote_it(tmp_path, path, value, allowed):
    section, key = path.split(".")
    job = tmp_path / "job.yaml"
    sections = {"data": {"path": "d"}}
    sections.setdefault(section, {})
    sections[section][key] = value
    job.write_text("model: {target: svi.models:LogisticRegression}\n" + "".join(
        f"{name}: {{{', '.join(f'{k}: {v}' for k, v in keys.items())}}}\n" for name, keys in sections.items()))
    for where, overrides in ((job, []), (tmp_path / "ok.yaml", [f"{path}={value}"])):
        (tmp_path / "ok.yaml").write_text("model: {target: svi.models:LogisticRegression}\ndata: {path: d}\n")
        with pytest.raises(ConfigError, match=rf"^config key {path}=.* is not allowed: {allowed}"):
            load_config(where, overrides)
    flat = next(s.name for s in specs() if s.path == path)
    with pytest.raises(OptionsError, match=rf"^option {flat}=") as e:
        FitOptions(**{flat: int(value)})
    assert e.value.key == flat


@pytest.mark.parametrize("key, value", [("compile", 1), ("antithetic", 0), ("progress", 1), ("stl", 0),
                                        ("resume", 1), ("compile_after", -1), ("compile_after", True)])
def test_a_number_is_not_taken_for_a_flag(key, value):
    """1 == True in Python: a flag given as 1 or 0 (or a step count as true) is refused by name
    rather than read as a setting it does not mean (compile=1 had run as 'auto')."""
    with pytest.raises(OptionsError, match=rf"^option {key}={value!r} is not allowed") as e:
        FitOptions(**{key: value}, checkpoint_dir="ck")
    assert e.value.key == key
    assert FitOptions(compile=True, stl="auto", antithetic=False, progress="auto", compile_after=0).compile is True


def test_a_fit_option_set_in_the_fit_section_points_at_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'fit.checkpoint_every' belongs in another section: checkpoint.every$"):
        load_config(config.Path("conf/quickstart.yaml"), ["fit.checkpoint_every=5"])
    with pytest.raises(ConfigError, match=r"checkpoint_every is set as checkpoint.every"):
        load_config(config.Path("conf/quickstart.yaml"), ["checkpoint_every=5"])


def test_a_job_config_gives_the_options_of_its_flat_equivalent(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("""name: roundtrip
model: {target: svi.models:LogisticRegression}
data: {path: d, prefetch: 2, standardize: [x], row_filter: [[a, ">", 1]], storage_options: {anon: true}}
fit: {family: fullrank, lr: 0.05, optimizer_options: {betas: [0.8, 0.9]}}
tracking: {uri: "sqlite:///t.db", wait: 5, experiment: e}
checkpoint: {dir: ck, every: 7, keep: 2}
""")
    flat = FitOptions(family="fullrank", lr=0.05, optimizer_options={"betas": [0.8, 0.9]}, prefetch=2,
                      standardize=["x"], row_filter=[["a", ">", 1]], storage_options={"anon": True},
                      tracking=True, tracking_uri="sqlite:///t.db", tracking_wait=5.0, experiment="e",
                      run_name="roundtrip", checkpoint_dir="ck", checkpoint_every=7, keep_checkpoints=2,
                      resume="auto")
    assert fit_options(load_config(job)) == flat
    assert fit_options(load_config(job, ["checkpoint.dir=null"])) == flat.replace(checkpoint_dir=None, resume=False)
