"""Typed configuration: defaults, per-block overrides and their resolution."""

import re
from pathlib import Path

import pytest
import yaml

from ccdrec.config import RunConfig
from ccdrec.errors import CcdrecError
from ccdrec.presets import load_config


def test_teacher_replay_labels_default_to_the_teachers_own_scale_and_the_student_keeps_source_labels():
    cfg = RunConfig()
    assert cfg.teacher.replay.labels == "rank" and cfg.student.replay.labels == "source"


def test_a_per_block_replay_override_changes_only_the_fields_it_names():
    cfg = load_config("yelp", overrides=["teacher.replay.resample_every=3", "blocks={2: {teacher_replay: {n_student: 1}}}"])
    two, one = cfg.teacher_replay(2), cfg.teacher_replay(1)
    assert two.n_student == 1 and one.n_student == 5
    assert two.model_dump(exclude={"n_student"}) == one.model_dump(exclude={"n_student"})  # labels, resample_every, ...
    assert cfg.student_replay(2) == cfg.student.replay
    # the resolved configuration (as written to a run directory) reads back to the same configuration
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_paper_preset_keeps_the_authors_per_block_budgets():
    cfg = load_config("yelp", preset="paper-yelp")
    got = [(r.top_a, r.n_stability, r.n_plasticity, r.n_student) for r in map(cfg.teacher_replay, range(1, 6))]
    assert got == [(100, 5, 0, 5), (100, 1, 3, 5), (50, 3, 5, 1), (100, 1, 3, 1), (100, 1, 5, 1)]  # method.md 5.3
    assert all(cfg.teacher_replay(k).labels == "rank" for k in range(1, 6))


def test_unknown_replay_labels_are_a_clear_error():
    with pytest.raises(CcdrecError, match="teacher.replay.labels"):
        load_config("yelp", overrides=["teacher.replay.labels=probability"])


def test_no_value_is_written_null_and_none_says_so():
    assert load_config("yelp", overrides=["teacher.base.max_steps=null"]).teacher.base.max_steps is None
    with pytest.raises(CcdrecError, match=r"max_steps: .*\(no value is written null\)"):
        load_config("yelp", overrides=["teacher.base.max_steps=none"])
    with pytest.raises(CcdrecError, match="greater than or equal to 1"):
        load_config("yelp", overrides=["student.replay.max_steps=0"])


@pytest.mark.parametrize(
    "override, where",
    [
        ("teacher.base.max_steps=true", "teacher.base.max_steps"),  # int | None
        ("student.update.epochs=false", "student.update.epochs"),  # int
        ("student.distill.lr=true", "student.distill.lr"),  # float
        ("student.rrd_weight=yes", "student.rrd_weight"),  # YAML 1.1 reads yes as true
        ("student.distill_from=true", "student.distill_from"),  # a name
        ("seed=false", "seed"),
    ],
)
def test_a_boolean_is_refused_where_a_field_is_not_a_switch(override, where):
    """pydantic reads true as 1 and false as 0.0; a boolean for a number hides a mistyped key or value."""
    with pytest.raises(CcdrecError, match=rf"{where}: takes a (number|name), not (true|false)"):
        load_config("yelp", overrides=[override])


def test_switches_still_take_booleans_and_numbers_still_take_numbers():
    cfg = load_config("yelp", overrides=["student.redistill=false", "teacher.base.max_steps=7", "student.distill.lr=1"])
    assert cfg.student.redistill is False and cfg.teacher.base.max_steps == 7 and cfg.student.distill.lr == 1.0
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a stored configuration reloads


def test_a_boolean_inside_a_list_or_as_a_block_key_is_refused(tmp_path):
    with pytest.raises(CcdrecError, match="ks: item 1 takes a number, not true"):
        load_config("yelp", overrides=["ks=[20,true]"])
    for key in ("true", "1.0"):  # YAML reads them as True and 1.0; pydantic would make both block 1
        f = tmp_path / f"blocks-{key}.yaml"
        f.write_text(f"blocks:\n  {key}: {{w_stability: 0.5}}\n")
        with pytest.raises(CcdrecError, match="the blocks key .* is not a block number"):
            load_config("yelp", file=f)
    f = tmp_path / "ok.yaml"
    f.write_text("blocks:\n  1: {w_stability: 0.5}\n")
    assert load_config("yelp", file=f).blocks[1].w_stability == 0.5


@pytest.mark.parametrize(
    "text",
    [
        "seed: 3\nseed: 4\n",
        "teacher: {base: {epochs: 7}}\nteacher: {update: {epochs: 2}}\n",  # the second would drop base.epochs
        "blocks:\n  1: {w_stability: 0.5}\n  '1': {w_stability: 0.2}\n",
    ],
)
def test_a_key_given_twice_in_a_yaml_file_is_an_error_not_the_last_one_winning(tmp_path, text):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    with pytest.raises(CcdrecError, match=r"cannot be parsed as YAML \(key '.*' is given twice \(lines \d+ and \d+\)\)"):
        load_config("yelp", file=f)


@pytest.mark.parametrize(
    "text, where",
    [
        ("student:\n  topn: [1,\n", "line 3, column 1"),
        ("student:\n\ttopn: 10\n", "line 2, column 1"),
        ("a: b: c\n", "line 1, column 5"),
    ],
)
def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path, text, where):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(CcdrecError, match=rf"bad.yaml: cannot be parsed as YAML \(.* at {where}\)$"):
        load_config("yelp", file=f)


@pytest.mark.parametrize(
    "members, same",
    [
        ("[{kind: mf, dim: 16}, {kind: mf, dim: 16}]", "members 0 and 1"),  # a seed left out
        ("[{kind: mf, dim: 16, seed: 0}, {kind: vae, dim: 16, seed: 0}, {kind: mf, dim: 16, seed: 0}]", "members 0 and 2"),
    ],
)
def test_two_members_that_train_the_same_model_are_refused(members, same):
    with pytest.raises(CcdrecError, match=f"teacher.members: {same} are the same model"):
        load_config("yelp", preset="quick", overrides=[f"teacher.members={members}"])


def test_members_that_differ_in_anything_are_an_ensemble():
    members = "[{kind: mf, dim: 16}, {kind: mf, dim: 16, seed: 1}, {kind: mf, dim: 32}, {kind: lightgcn, dim: 16}]"
    cfg = load_config("yelp", preset="quick", overrides=[f"teacher.members={members}"])
    assert len(cfg.teacher.members) == 4


def test_teacher_cycles_and_the_last_one_before_a_block():
    from ccdrec.config import TeacherConfig

    t = TeacherConfig(update_every=3)
    assert [t.is_teacher_cycle(k) for k in range(1, 8)] == [False, False, True, False, False, True, False]
    assert [t.last_cycle(k) for k in range(8)] == [0, 0, 0, 3, 3, 3, 6, 6]
    assert [TeacherConfig().last_cycle(k) for k in range(4)] == [0, 1, 2, 3]


def test_the_command_line_bounds_seeds_as_the_configuration_does():
    from ccdrec import cli, config

    assert cli.SEED_MAX == config.SEED_MAX


def test_a_stream_directory_starts_from_the_defaults_not_a_bundled_datasets_preset(tmp_path):
    """Yelp's preset caps block 0's teachers at 50 epochs (its time budget); a user's own stream takes
    the library defaults, where early stopping decides (up to 150 epochs, patience 6)."""
    from ccdrec.config import BPR_SCHEDULE

    assert load_config("yelp").teacher.base.epochs == 50
    assert load_config().teacher.base.epochs == 50  # no dataset: Yelp, with its preset
    own = load_config(tmp_path)
    assert own.teacher.base == BPR_SCHEDULE and own.dataset == str(tmp_path.resolve())
    assert load_config(tmp_path, preset="yelp").teacher.base.epochs == 50  # a named preset still applies
    assert load_config("gowalla").teacher.base.epochs == 40


def test_an_empty_configuration_file_changes_nothing_and_a_dotted_key_says_how_to_nest_it(tmp_path):
    for text in ("", "# no fields yet\n"):
        f = tmp_path / "empty.yaml"
        f.write_text(text)
        assert load_config("yelp", file=f) == load_config("yelp")
    f = tmp_path / "dotted.yaml"
    f.write_text("student.model.dim: 16\n")
    with pytest.raises(CcdrecError, match=r"student\.model\.dim: .* \(a file nests fields: student: \{model: \{dim: \.\.\.\}\}"):
        load_config("yelp", file=f)
    f.write_text("[1, 2]\n")
    with pytest.raises(CcdrecError, match="must hold a mapping of fields"):
        load_config("yelp", file=f)


def test_a_number_of_thousands_of_digits_is_an_error_not_a_traceback(tmp_path):
    huge = "9" * 5000
    with pytest.raises(CcdrecError, match=r"^override seed=\.\.\.: a number of thousands of digits"):
        load_config("yelp", overrides=[f"seed={huge}"])
    for name, text in (("big.yaml", f"seed: {huge}\n"), ("big.toml", f"seed = {huge}\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(CcdrecError, match=r"big\.(yaml|toml): a number of thousands of digits"):
            load_config("yelp", file=tmp_path / name)


@pytest.mark.parametrize("text", ["seed = 3\n", "[student]\ntopn = 20\n", 'dataset = "yelp"\n[teacher]\nlwc_weight = 0.001\n'])
def test_a_toml_file_not_named_toml_says_how_to_name_it_and_toml_is_read_whatever_the_suffix_case(tmp_path, text):
    f = tmp_path / "run.cfg"
    f.write_text(text)
    with pytest.raises(
        CcdrecError, match=r"run\.cfg: .*; it reads as TOML: name it run\.toml \(TOML is read from files ending in \.toml\)$"
    ):
        load_config("yelp", file=f)
    upper, lower = tmp_path / "run.TOML", tmp_path / "run.toml"
    upper.write_text(text)
    lower.write_text(text)
    assert load_config("yelp", file=upper) == load_config("yelp", file=lower) != load_config("yelp")
    yml = tmp_path / "y.toml"
    yml.write_text("seed: 3\nstudent:\n  topn: 20\n")  # the other way round
    with pytest.raises(CcdrecError, match=r"y\.toml: cannot be parsed as TOML \(.*\); it reads as YAML: name it y\.yaml$"):
        load_config("yelp", file=yml)
    plain = tmp_path / "plain.yaml"
    plain.write_text("[1, 2]\n")  # not TOML either: no hint
    with pytest.raises(CcdrecError, match=r"must hold a mapping of fields$"):
        load_config("yelp", file=plain)


def test_one_block_under_two_keys_is_an_error_and_a_block_names_the_fields_it_can_override(tmp_path):
    f = tmp_path / "blocks.yaml"
    f.write_text('blocks:\n  1: {w_stability: 0.5}\n  "01": {w_plasticity: 0.5}\n')  # one override used to be lost
    with pytest.raises(CcdrecError, match=r"blocks.yaml: block 1 is given twice \(keys 1 and '01'\)"):
        load_config("yelp", file=f)
    both = load_config("yelp", overrides=["blocks.1.w_stability=0.5", "blocks.01.w_plasticity=0.5"]).blocks[1]
    assert (both.w_stability, both.w_plasticity) == (0.5, 0.5)
    with pytest.raises(CcdrecError, match="--set names blocks.1.w_stability twice"):  # one field, two spellings
        load_config("yelp", overrides=["blocks.1.w_stability=0.4", "blocks.01.w_stability=0.2"])
    with pytest.raises(CcdrecError, match="key '1.0' is given twice"):  # a dict takes 1 and 1.0 for one key
        load_config("yelp", overrides=["blocks={1: {w_stability: 0.3}, 1.0: {w_plasticity: 0.2}}"])
    # across layers the keys name one block, the later layer's fields winning: a TOML file's string keys
    # over a preset's integer keys, --set over a file, a run's stored config.yaml ('1') reused as a file
    toml = tmp_path / "b.toml"
    toml.write_text("[blocks.1]\nw_stability = 0.3\n")
    paper = load_config("yelp", preset="paper-yelp").blocks[1]
    over = load_config("yelp", preset="paper-yelp", file=toml).blocks[1]
    assert over.w_stability == 0.3 and over.student_replay == paper.student_replay
    assert load_config("yelp", file=toml, overrides=["blocks.1.w_stability=0.5"]).blocks[1].w_stability == 0.5
    stored = tmp_path / "stored.yaml"
    stored.write_text(yaml.safe_dump(load_config("yelp", preset="paper-yelp").model_dump(mode="json")))
    assert "'1':" in stored.read_text()
    assert (
        load_config("yelp", preset="paper-yelp", file=stored, overrides=["blocks.1.w_stability=0.5"]).blocks[1].w_stability == 0.5
    )
    for field in ("student", "seed"):
        with pytest.raises(
            CcdrecError,
            match=rf"blocks\.1: a per-block override takes student_replay, teacher_replay, "
            rf"w_stability, w_plasticity; not '{field}'",
        ):
            load_config("yelp", overrides=[f"blocks.1.{field}=3"])


@pytest.mark.parametrize("written, read", [("010", 10), ("007", 7), ("+12", 12), ("12", 12)])
def test_whole_numbers_are_decimal_in_files_and_overrides_never_octal(tmp_path, written, read):
    f = tmp_path / "c.yaml"
    f.write_text(f"teacher:\n  base: {{epochs: {written}}}\n")  # YAML 1.1 read 010 as 8
    assert load_config("yelp", file=f).teacher.base.epochs == read
    assert load_config("yelp", overrides=[f"teacher.base.epochs={written}"]).teacher.base.epochs == read


@pytest.mark.parametrize("written", ["0x10", "0o10", "1:30", "0b11"])
def test_hexadecimal_octal_and_sexagesimal_numbers_are_refused_not_converted(tmp_path, written):
    with pytest.raises(CcdrecError, match="teacher.base.epochs: Input should be a valid integer"):
        load_config("yelp", overrides=[f"teacher.base.epochs={written}"])
    with pytest.raises(CcdrecError, match="student.update.lr: Input should be a valid number"):
        load_config("yelp", overrides=[f"student.update.lr={written}.0"])  # 1:30.0 was 90.0


@pytest.mark.parametrize(
    "override",
    ["teacher.members=[{kind: mf, dim: 8}", "student.model={kind: mf, dim: 8", "teacher.members=[", "ks=[20, 50"],
)
def test_a_list_or_mapping_that_does_not_parse_says_so_instead_of_being_read_as_text(override):
    key, _, value = override.partition("=")
    with pytest.raises(
        CcdrecError,
        match=rf"^override {re.escape(key)}=\.\.\.: {re.escape(repr(value))} cannot be parsed \(.* at line 1, column \d+\)$",
    ):
        load_config("yelp", overrides=[override])


def test_a_byte_order_mark_is_read_in_toml_as_in_yaml_and_a_device_is_not_a_missing_file(tmp_path):
    for name, text in (("bom.toml", "seed = 3\n"), ("bom.yaml", "seed: 3\n")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_config("yelp", file=tmp_path / name).seed == 3
    with pytest.raises(CcdrecError, match=r"^/dev/null: not a regular file; --config takes a YAML or TOML file$"):
        load_config("yelp", file=Path("/dev/null"))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "student.model={kind: mf, dim: 8, layers: 5}",
            "student.model: .*layers is the number of LightGCN propagation layers; kind mf has none",
        ),
        ("teacher.members=[{kind: vae, dim: 8, layers: 7}]", "teacher.members.0: .*kind vae has none"),
        (
            "teacher.members=[{kind: mf, dim: 8, dropout: 0.1}]",
            "teacher.members.0: .*dropout is the Mult-VAE's input dropout; kind mf has none",
        ),
    ],
)
def test_a_part_the_model_family_does_not_have_is_refused_not_ignored(override, message):
    with pytest.raises(CcdrecError, match=message):
        load_config("yelp", overrides=[override])
    # a stored configuration writes every field at its default, and still loads
    stored = load_config("yelp", overrides=["student.model={kind: mf, dim: 8}"]).model_dump()
    assert stored["student"]["model"]["layers"] == 2 and RunConfig.model_validate(stored).student.model.kind == "mf"


@pytest.mark.parametrize("value", ["mf", "5", "[{kind: mf}]"])
def test_the_student_model_set_whole_says_it_takes_a_mapping(value):
    with pytest.raises(
        CcdrecError, match=r"student.model: takes a mapping such as \{kind: mf, dim: 16\}, .*student.model.kind=mf$"
    ):
        load_config("yelp", overrides=[f"student.model={value}"])


def test_block_keys_that_are_not_block_numbers_are_refused_in_every_layer(tmp_path):
    # True and 1.0 are the dict key 1: with a preset's block 1 they were merged into it without a word
    for override in ("blocks={true: {w_stability: 0.3}}", "blocks={1.0: {w_stability: 0.3}}"):
        for preset in ("paper-yelp", "quick"):
            with pytest.raises(CcdrecError, match="is not a block number|not a whole number"):
                load_config("yelp", preset=preset, overrides=[override])
    # a digit that is not an ASCII one ('²'.isdigit() is True) is an error, not a traceback
    with pytest.raises(CcdrecError, match=r"blocks\.²"):
        load_config("yelp", overrides=["blocks.².w_stability=0.4"])
    f = tmp_path / "sup.yaml"
    f.write_text('blocks: {"²": {w_stability: 0.5}}\n')
    with pytest.raises(CcdrecError, match="blocks"):
        load_config("yelp", file=f)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["teacher.base={epochs: 2}", "teacher.base.epochs=3"], "teacher.base.epochs"),
        (["teacher.base.epochs=3", "teacher.base={epochs: 2}"], "teacher.base.epochs"),
        (["blocks.1.w_stability=0.4", "blocks={1: {w_stability: 0.1}}"], "blocks.1.w_stability"),
    ],
)
def test_a_field_set_whole_and_on_its_own_is_given_twice(overrides, named):
    with pytest.raises(CcdrecError, match=rf"--set names {re.escape(named)} twice \(also inside .*=\.\.\.\); give it once$"):
        load_config("yelp", overrides=overrides)
