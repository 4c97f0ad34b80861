"""One parameter style for every section: each bad key is refused naming ``<section>.<key>`` and the fix,
and every problem of a section is listed together (the run checks, ``kedro_glue.run_checks.run_problems``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from best_minibatch.analysis.report import VisualizeConfig
from best_minibatch.analysis.statistics import DEFAULT_PARAMETERS, AnalysisConfig
from best_minibatch.batches.batching import SortBatchesConfig
from best_minibatch.config import ConfigError, Section, every_problem
from best_minibatch.data.cifar import SourceConfig
from best_minibatch.gradient_training import TrainingConfig, TrainingConfigError
from best_minibatch.kedro_glue.run_checks import RunFacts, run_problems
from best_minibatch.metrics.scoring import MetricConfigError, all_metric_options, metric_options
from best_minibatch.selection.config import SelectionConfig, SelectionConfigError
from best_minibatch.training.recipe import TrainingRecipe

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("ingest_cifar", "score_metrics", "sort_batches", "distance_analysis", "visualize", "batch_selection")


@pytest.fixture
def base(monkeypatch) -> dict:
    """conf/base's parameters (relative paths start at the project root)."""
    monkeypatch.chdir(ROOT)
    parameters = {}
    for path in sorted((ROOT / "conf/base").glob("parameters*.yml")):
        parameters.update(yaml.safe_load(path.read_text()))
    return parameters


def problems_of(parameters: dict, section: str, **overrides) -> list[str]:
    changed = {**parameters, section: {**parameters[section], **overrides}}
    return run_problems(changed, [section], RunFacts())


def test_the_base_parameters_pass_every_section(base):
    assert run_problems(base, SECTIONS, RunFacts()) == []


@pytest.mark.parametrize(("section", "overrides", "expected"), [
    ("ingest_cifar", {"source": {"path": "data/01_raw/cifar10-sample.zip", "layout": "zip"}},
     "Parameter ingest_cifar.source.layout: unknown value 'zip'. Use one of auto, image_folder, cifar_python. "
     "(conf/<env>/parameters_ingest_cifar.yml)"),
    ("ingest_cifar", {"source": {"layout": "auto"}},
     "Parameter ingest_cifar.source.path: is missing. Set it to the raw dataset"),
    ("score_metrics", {"edges": {"blur_sigma": -1}},
     "Parameter score_metrics.edges.blur_sigma: must be a non-negative number, got -1. Use 0 (derived from the "
     "kernel size) or e.g. 1. (conf/<env>/parameters_score_metrics.yml)"),
    ("score_metrics", {"edges": {"low_threshold": 300, "high_threshold": 200}},
     "Parameter score_metrics.edges.low_threshold: 300 exceeds high_threshold (200). Swap them"),
    ("score_metrics", {"perceptual": {"device": "tpu"}},
     "Parameter score_metrics.perceptual.device: unknown value 'tpu'. Use one of cpu, cuda, auto."),
    ("score_metrics", {"random": {"sed": 1}},
     "Parameter score_metrics.random.sed: unknown parameter. Known parameters: seed. Did you mean 'seed'?"),
    ("sort_batches", {"tie_seed": "0"},
     "Parameter sort_batches.tie_seed: must be a non-negative integer, got '0'. Use e.g. 0. "
     "(conf/<env>/parameters_sort_batches.yml)"),
    ("sort_batches", {"stratify": "no"}, "Parameter sort_batches.stratify: must be true or false, got 'no'."),
    ("distance_analysis", {"confidence": 1.0},
     "Parameter distance_analysis.confidence: must be a number in (0.5, 1), got 1.0. Use e.g. 0.95. "
     "(conf/<env>/parameters_distance_analysis.yml)"),
    ("distance_analysis", {"n_best_worst": 0},
     "Parameter distance_analysis.n_best_worst: must be a positive integer, got 0. Use e.g. 3."),
    ("distance_analysis", {"n_bootstrp": 500},
     "Parameter distance_analysis.n_bootstrp: unknown parameter. Known parameters: alpha, confidence, "
     "n_best_worst, n_bootstrap, n_permutations, null_ordering, seed. Did you mean 'n_bootstrap'?"),
    ("visualize", {"report_png_dpi": 9.5},
     "Parameter visualize.report_png_dpi: must be an integer of at least 10, got 9.5. Use e.g. 110. "
     "(conf/<env>/parameters_visualize.yml)"),
    ("batch_selection", {"seeds": [1, 1]},
     "Parameter batch_selection.seeds: expected a non-empty list of distinct non-negative integers, got [1, 1]. "
     "Use e.g. [0, 1, 2, 3, 4]"),
], ids=["ingest-layout", "ingest-path-missing", "edges-sigma", "edges-thresholds", "perceptual-device",
        "random-misspelled", "sort-tie-seed", "sort-stratify", "analysis-confidence", "analysis-best-worst",
        "analysis-misspelled", "visualize-dpi", "selection-seeds"])
def test_a_bad_key_of_every_section_is_refused_naming_it_and_the_fix(base, section, overrides, expected):
    problems = problems_of(base, section, **overrides)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


@pytest.mark.parametrize(("section", "overrides", "keys"), [
    ("ingest_cifar", {"source": {"path": 7, "layout": "zip", "download": "yes"}},
     ["ingest_cifar.source.layout", "ingest_cifar.source.download", "ingest_cifar.source.path"]),
    ("score_metrics", {"sharpness": {}, "edges": {"aperture_size": 4, "blur_kernel_size": 2},
                       "perceptual": {"batch_size": 0}, "random": {"seed": -1}},
     ["score_metrics.sharpness", "score_metrics.edges.aperture_size", "score_metrics.edges.blur_kernel_size",
      "score_metrics.perceptual.batch_size", "score_metrics.random.seed"]),
    ("sort_batches", {"batch_size": 0, "tie_seed": -1, "control_batchings": 0},
     ["sort_batches.tie_seed", "sort_batches.control_batchings", "sort_batches.batch_size"]),
    ("distance_analysis", {"alpha": 0.7, "n_permutations": 10, "seed": -2},
     ["distance_analysis.alpha", "distance_analysis.n_permutations", "distance_analysis.seed"]),
    ("visualize", {"report_title": 3, "report_png_dpi": 0},
     ["visualize.report_title", "visualize.report_png_dpi"]),
])
def test_every_problem_of_a_section_is_reported_together(base, section, overrides, keys):
    problems = problems_of(base, section, **overrides)
    assert [problem.split(":")[0] for problem in problems] == [f"Parameter {key}" for key in keys], problems


def test_sections_with_problems_are_all_listed_in_one_run_check(base):
    changed = {**base, "sort_batches": {**base["sort_batches"], "tie_seed": -1},
               "visualize": {**base["visualize"], "report_png_dpi": 1},
               "distance_analysis": {**base["distance_analysis"], "alpha": 0}}
    problems = run_problems(changed, SECTIONS, RunFacts())
    assert [p.split(":")[0] for p in problems] == ["Parameter sort_batches.tie_seed",
                                                   "Parameter distance_analysis.alpha",
                                                   "Parameter visualize.report_png_dpi"]


def test_each_config_raises_a_config_error_its_callers_can_catch():
    for build, params, caught in [
        (SortBatchesConfig.from_params, {"batch_size": 0}, ValueError),
        (SourceConfig.from_params, {"source": {"path": "x", "layout": "zip"}}, ValueError),
        (AnalysisConfig.from_params, {"alpha": 2}, ValueError),
        (VisualizeConfig.from_params, {"report_png_dpi": 1}, ValueError),
        (lambda p: metric_options("edges", p), {"edges": {"aperture_size": 4}}, MetricConfigError),
    ]:
        with pytest.raises(caught) as raised:
            build(params)
        assert isinstance(raised.value, ConfigError) and str(raised.value).startswith(f"Parameter {raised.value.key}: ")


def test_the_configs_read_what_the_nodes_used_to_read():
    """Bit for bit: the values handed to the science are the values of the parameters, with the same defaults."""
    assert SortBatchesConfig.from_params({"batch_size": 100}) == SortBatchesConfig(100, 0, True, 1)
    assert SourceConfig.from_params({"source": {"path": "a.zip"}}) == SourceConfig("a.zip", "auto", False, "data/01_raw")
    assert DEFAULT_PARAMETERS == {"null_ordering": "random", "alpha": 0.05, "n_permutations": 20000,
                                  "n_bootstrap": 2000, "confidence": 0.95, "seed": 0, "n_best_worst": 3}
    assert VisualizeConfig.from_params(None) == VisualizeConfig("Run report", 110)
    options = all_metric_options({"edges": {"low_threshold": 50, "aperture_size": 5}, "random": {"seed": 3}})
    assert options["edges"] == {"low_threshold": 50.0, "high_threshold": 200.0, "aperture_size": 5,
                                "l2_gradient": False, "blur_kernel_size": 0, "blur_sigma": 0.0}
    assert type(options["edges"]["low_threshold"]) is float and type(options["edges"]["aperture_size"]) is int
    assert options["random"] == {"seed": 3} and options["intensity"] == {} and options["color"] == {}
    assert options["perceptual"] == {"backbone_weights": None, "download": False, "strict": False,
                                     "upsample_to": None, "batch_size": 500, "device": "cpu", "cpu_threads": 1}


def test_seeds_have_one_reader():
    """gradient_training and batch_selection refuse bad seeds with the same words (Section.seeds)."""
    words = "expected a non-empty list of distinct non-negative integers, got [2, 2]"
    with pytest.raises(TrainingConfigError, match=r"Parameter gradient_training\.seeds: " + words.replace("[", r"\[")
                       .replace("]", r"\]")):
        TrainingConfig.from_params({"seeds": [2, 2]})
    with pytest.raises(SelectionConfigError, match=r"Parameter batch_selection\.seeds: " + words.replace("[", r"\[")
                       .replace("]", r"\]")):
        SelectionConfig.from_params({"seeds": [2, 2], "target_validation_accuracy": 0.4}, sort_batch_size=10)
    assert Section({"seeds": [3, 0]}, "x", ("seeds",)).seeds("seeds", None, "") == (3, 0)
    for bad in (None, [], [0, -1], [0, True], "0", [1.0]):
        with pytest.raises(ConfigError, match=r"Parameter x\.seeds: expected a non-empty list"):
            Section({"seeds": bad}, "x", ("seeds",)).seeds("seeds", None, "Use e.g. [0].")


def test_a_bad_shared_model_is_named_under_training_not_under_the_override():
    """Before: a bad shared training.model.name, merged with gradient_training.training.model, was reported as
    gradient_training.training.model.name."""
    with pytest.raises(TrainingConfigError, match=r"^Parameter training\.model\.name: unknown value 'vgg16'"):
        TrainingConfig.from_params({"training": {"model": {"small_cnn": {"width": 4}}}}, {"model": {"name": "vgg16"}})
    with pytest.raises(ConfigError, match=r"^Parameter training\.model\.small_cnn\.wdth: small_cnn does not take"):
        TrainingRecipe.from_params({"model": {"name": "small_cnn", "small_cnn": {"wdth": 3}}},
                                   {"model": {"name": "small_cnn"}}, override_path="batch_selection.training")
    # What the override itself sets is still named under the override.
    with pytest.raises(TrainingConfigError, match=r"^Parameter gradient_training\.training\.model\.name: unknown"):
        TrainingConfig.from_params({"training": {"model": {"name": "vgg16"}}}, {"model": {"name": "small_cnn"}})
    with pytest.raises(ConfigError, match=r"^Parameter batch_selection\.training\.model\.small_cnn\.wdth: "):
        TrainingRecipe.from_params({"model": {"name": "small_cnn"}}, {"model": {"small_cnn": {"wdth": 3}}},
                                   override_path="batch_selection.training")


def test_a_required_key_taken_out_is_not_reported_as_missing_as_well():
    with pytest.raises(ValueError) as raised:
        every_problem(SortBatchesConfig.from_params, {"batch_size": 0, "tie_seed": -1}, "sort_batches")
    message = str(raised.value)
    assert "sort_batches.tie_seed: must be" in message and "sort_batches.batch_size: must be" in message
    assert "is missing" not in message and message.count("\n  - ") == 1


def test_control_batchings_are_checked_against_the_seeds_read_by_their_one_reader(base):
    """sort_batches reads gradient_training.seeds through TrainingConfig (Section.seeds), not as a raw list."""
    changed = {**base, "sort_batches": {**base["sort_batches"], "control_batchings": 2},
               "gradient_training": {**base["gradient_training"], "seeds": [0, 1, 2]}}
    problems = run_problems(changed, ["sort_batches"], RunFacts())
    assert problems == ["Parameter sort_batches.control_batchings=2 is less than the 3 gradient_training.seeds: each "
                        "seed trains its own random batching. Set it to at least 3."]
    # Bad seeds are gradient_training's own problem: sort_batches' check neither fails on them nor repeats them.
    changed["gradient_training"]["seeds"] = [0, 0, 1]
    assert run_problems(changed, ["sort_batches"], RunFacts()) == []


@pytest.mark.parametrize("section", ["score_metrics", "sort_batches", "distance_analysis", "visualize"])
def test_a_section_that_is_not_a_mapping_is_one_listed_problem(base, section):
    problems = run_problems({**base, section: 3}, [section], RunFacts())
    assert problems[0].startswith(f"Parameter {section}: expected a mapping, got 3. Write it as a YAML mapping."), problems
    assert len(problems) == 1, problems


def test_the_nodes_read_the_analysis_and_visualize_sections_through_their_configs():
    from best_minibatch.pipelines.distance_analysis import nodes as analysis_nodes
    from best_minibatch.pipelines.visualize import nodes as visualize_nodes

    with pytest.raises(ConfigError, match=r"^Parameter distance_analysis\.n_best_worst: must be a positive integer"):
        analysis_nodes.select_best_and_worst_batches(None, {"n_best_worst": 0})
    with pytest.raises(ConfigError, match=r"^Parameter visualize\.report_png_dpi: must be an integer of at least 10"):
        visualize_nodes._outputs({}, {"report_png_dpi": 5})
    assert visualize_nodes._outputs({}, {"report_png_dpi": 20}) == ({}, {}, {})
