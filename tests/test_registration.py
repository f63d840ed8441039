"""Registration inside the real installed Xinference, each check in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json, os, sys
    import xinference.model.llm as llm
    from xinference.model.llm.llm_family import check_engine_by_spec_parameters, match_llm
    from ovis2_xinf import registration

    def snapshot():
        family = next(f for f in llm.BUILTIN_LLM_FAMILIES if f.model_name == "Ovis2")
        params = llm.LLM_ENGINES["Ovis2"]["Transformers"]
        return {
            "status": registration.status(),
            "first_class": llm.SUPPORTED_ENGINES["Transformers"][0].__name__,
            "same_list": llm.SUPPORTED_ENGINES["Transformers"] is llm.TRANSFORMERS_CLASSES,
            "ovis2_families": sum(f.model_name == "Ovis2" for f in llm.BUILTIN_LLM_FAMILIES),
            "has_chat_template": family.chat_template is not None,
            # Ours carries the catalogue metadata on both hubs; the built-in on Hugging Face only.
            "modelscope_metadata": all(s.model_metadata is not None for s in family.model_specs
                                       if s.model_hub == "modelscope"),
            "specs": sorted((s.model_hub, s.model_format, s.model_size_in_billions, s.quantization, s.model_id)
                            for s in family.model_specs),
            "choices": sorted((p["model_format"], p["model_size_in_billions"], tuple(p["quantizations"]),
                               p["llm_class"].__name__) for p in params),
            "version_infos": len(llm.LLM_VERSION_INFOS.get("Ovis2", [])),
        }

    out = {"initial": snapshot()}
    if os.environ.get("PROBE_ACTIVATE"):
        os.environ.pop("OVIS2_XINF_DISABLE")
        registration.activate()
        out["activated"] = snapshot()
    llm.register_builtin_model()
    out["refreshed"] = snapshot()
    out["launch_class"] = check_engine_by_spec_parameters("Transformers", "Ovis2", "gptq", 34, "Int8").__name__
    family = match_llm("Ovis2", "gptq", 34, "Int8", download_hub="modelscope")
    out["matched"] = [family.model_specs[0].model_id, family.model_specs[0].model_hub]
    print("PROBE" + json.dumps(out))
    """
)


def _probe(**env) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k != "OVIS2_XINF_DISABLE"}
    full_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env, stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


@pytest.fixture(scope="module")
def active() -> dict:
    return _probe()


def _expected_choices():
    rows = [("pytorch", n, ("none",)) for n in (1, 2, 4, 8, 16, 34)]
    rows += [("gptq", n, ("Int4",)) for n in (2, 4, 8, 16)] + [("gptq", 34, ("Int4", "Int8"))]
    return sorted((*row, "Ovis2NativeChatModel") for row in rows)


def test_our_class_is_first_for_transformers(active):
    snap = active["initial"]
    assert snap["first_class"] == "Ovis2NativeChatModel"
    assert snap["same_list"]
    assert snap["status"]["class_first"] and snap["status"]["family_is_ours"]


def test_family_comes_from_specs_json(active):
    from ovis2_xinf.catalog import resolve_all

    snap = active["initial"]
    assert snap["ovis2_families"] == 1
    assert snap["has_chat_template"] and snap["modelscope_metadata"]
    expected = sorted((r.hub, r.model_format, r.model_size_in_billions, r.quantization, r.model_id)
                      for r in resolve_all())
    assert [tuple(s) for s in snap["specs"]] == expected
    assert snap["version_infos"] == 12


def test_engines_offer_transformers_for_all_eleven_choices(active):
    assert [tuple(c[:2]) + (tuple(c[2]), c[3]) for c in active["initial"]["choices"]] == _expected_choices()


def test_survives_catalog_refresh(active):
    refreshed = active["refreshed"]
    assert refreshed["first_class"] == "Ovis2NativeChatModel"
    assert refreshed["ovis2_families"] == 1
    assert refreshed["status"]["family_is_ours"]
    assert refreshed["specs"] == active["initial"]["specs"]
    assert refreshed["choices"] == active["initial"]["choices"]


def test_launch_resolves_to_our_class_and_hub_ids(active):
    assert active["launch_class"] == "Ovis2NativeChatModel"
    assert active["matched"] == ["AIDC-AI/Ovis2-34B-GPTQ-Int8", "modelscope"]


def test_opt_out_env_var_keeps_the_builtin():
    snap = _probe(OVIS2_XINF_DISABLE="1")["initial"]
    assert snap["first_class"] != "Ovis2NativeChatModel"
    assert not snap["modelscope_metadata"]  # Xinference's own Ovis2 family
    assert not snap["status"]["class_first"] and not snap["status"]["family_is_ours"]
    assert {c[3] for c in snap["choices"]} == {"Ovis2ChatModel"}


def test_activate_after_bootstrap():
    result = _probe(OVIS2_XINF_DISABLE="1", PROBE_ACTIVATE="1")
    assert result["initial"]["first_class"] != "Ovis2NativeChatModel"
    for key in ("activated", "refreshed"):
        assert result[key]["first_class"] == "Ovis2NativeChatModel"
        assert result[key]["status"]["family_is_ours"]
        assert result[key]["ovis2_families"] == 1
    assert result["launch_class"] == "Ovis2NativeChatModel"


def test_interpreter_start_imports_nothing_but_the_hook():
    code = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(json.loads(done.stdout))
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "__main__"}
    assert third_party <= {"ovis2_xinf", "ovis2_xinf._autoload", "_distutils_hack", "_virtualenv"}
    assert "ovis2_xinf._autoload" in modules  # the .pth armed the hook
    assert not any(m.startswith(("xinference", "torch", "pydantic", "transformers")) for m in modules)


def test_unsupported_xinference_version_is_refused_with_a_log_line(caplog, monkeypatch):
    from types import ModuleType

    from ovis2_xinf import registration

    monkeypatch.setattr(registration, "xinference_version", lambda: "3.5.0")
    with caplog.at_level("WARNING", logger="ovis2_xinf.registration"):
        assert registration.on_llm_module_loaded(ModuleType("fake")) is False
    assert "Xinference 3.5.0 is not supported (need >=4.1,<5.0)" in caplog.text


def test_version_range():
    from ovis2_xinf.registration import is_supported_version

    assert is_supported_version("4.1.0") and is_supported_version("4.9.2")
    assert not is_supported_version("4.0.1") and not is_supported_version("5.0.0")
    assert not is_supported_version(None)


def test_importing_our_model_module_first_registers_too():
    """What a model subprocess does: our module is the one that imports Xinference."""
    code = ("import json, ovis2_xinf.model, xinference.model.llm as llm; from ovis2_xinf.registration import status; "
            "print('PROBE' + json.dumps([status(), llm.SUPPORTED_ENGINES['Transformers'][0].__name__]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Failed to run LLM engine registration hook" not in done.stderr
    state, first = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("PROBE"))[5:])
    assert first == "Ovis2NativeChatModel" and state["class_first"] and state["family_is_ours"]
    assert state["engine_classes"] == ["Ovis2NativeChatModel"]


def test_imports_run_one_way():
    """The model class is readable without the registration layer, and the registration
    layer without the model class: neither module imports the other when imported."""
    probe = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
             "print(sorted(m for m in sys.modules if m.startswith('ovis2_xinf.')))")
    env = {k: v for k, v in os.environ.items() if k != "OVIS2_XINF_DISABLE"}
    loaded = {}
    for module in ("ovis2_xinf.model", "ovis2_xinf.registration"):
        done = subprocess.run([sys.executable, "-S", "-c", probe, module], capture_output=True, text=True, env={
            **env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}, stdin=subprocess.DEVNULL, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        loaded[module] = json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert "ovis2_xinf.registration" not in loaded["ovis2_xinf.model"]
    assert "ovis2_xinf.model" not in loaded["ovis2_xinf.registration"]
