"""Requests: every field typed and checked, errors naming the place and the field, the CLI line."""

import pytest

from attnkit import AttnkitError
from attnkit.runs import Field, Method, cli_line, get_method, method_names, parse_request, register
from attnkit.runs.spec import REGISTRY


def test_the_built_in_methods_are_registered():
    assert {"generate", "maps", "edit", "invert"} <= set(method_names())


def test_defaults_are_filled_and_given_arguments_kept():
    request = parse_request({"method": "generate", "prompt": "a red circle", "seed": 3})
    assert request.args == {"prompt": "a red circle", "seed": 3, "steps": None, "guidance": None, "height": None,
                            "width": None}
    assert request.given() == {"prompt": "a red circle", "seed": 3}
    assert request.to_job("j1") == {"id": "j1", "method": "generate", "prompt": "a red circle", "seed": 3}


@pytest.mark.parametrize("data, message", [
    ({"prompt": "a cat"}, "field 'method' is required"),
    ({"method": "paint", "prompt": "a cat"}, "field 'method': unknown method 'paint'"),
    ({"method": "generate"}, "field 'prompt': is required"),
    ({"method": "generate", "prompt": "   "}, "field 'prompt': is empty"),
    ({"method": "generate", "prompt": "a cat", "colour": 1}, "field 'colour': method 'generate' has no such"),
    ({"method": "generate", "prompt": "a cat", "steps": "many"}, "field 'steps': 'many' is not an integer"),
    ({"method": "generate", "prompt": "a cat", "steps": 2.5}, "field 'steps': 2.5 is not an integer"),
    ({"method": "generate", "prompt": "a cat", "steps": 0}, "field 'steps': 0 is below"),
    ({"method": "generate", "prompt": "a cat", "seed": True}, "field 'seed': give an integer, not bool"),
    ({"method": "generate", "prompt": "a cat", "guidance": float("nan")}, "field 'guidance': nan is not a finite"),
    ({"method": "generate", "prompt": 3}, "field 'prompt': give a string, not int"),
    ({"method": "edit", "source": "a cat", "targets": ["a dog"], "cross": 1.5}, "field 'cross': 1.5 is not a fraction"),
    ({"method": "edit", "source": "a cat", "targets": ["a dog"], "self": [0.6, 0.2]}, "start 0.6 is after end"),
    ({"method": "edit", "source": "a cat", "targets": [""]}, "field 'targets': an entry is empty"),
    ({"method": "edit", "source": "a cat", "targets": ["a dog"], "reweight": "dog"}, "'dog': use WORD=FACTOR"),
    ({"method": "edit", "source": "a cat", "targets": ["a dog"], "kind": "swap"}, "'swap' is not one of"),
    ({"method": "maps", "prompt": "a cat", "self_at": [1]}, "field 'self_at': give the query pixel"),
    ({"method": "invert", "image": "no/such/file.png", "prompt": "a cat"}, "field 'image': 'no/such/file.png' does"),
])
def test_bad_arguments_name_the_place_and_the_field(data, message):
    with pytest.raises(AttnkitError, match="^line 7: ") as caught:
        parse_request(data, where="line 7")
    assert message in str(caught.value)


def test_text_forms_of_values_parse_like_their_json_forms():
    text = parse_request({"method": "edit", "source": "a lemon cake", "targets": "a lego cake", "cross": "0.2,0.8",
                          "reweight": "lego=2, cake=-1", "blend": "cake lemon", "steps": "3"})
    json_form = parse_request({"method": "edit", "source": "a lemon cake", "targets": ["a lego cake"],
                               "cross": [0.2, 0.8], "reweight": {"lego": 2, "cake": -1}, "blend": ["cake", "lemon"],
                               "steps": 3})
    assert text == json_form
    assert text.args["cross"] == (0.2, 0.8) and text.args["reweight"] == {"lego": 2.0, "cake": -1.0}
    assert parse_request({"method": "maps", "prompt": "a cat", "self_at": "4, 5"}).args["self_at"] == (4, 5)


def test_cli_line_speaks_the_cli_and_falls_back_to_batch_for_what_it_cannot_say():
    request = parse_request({"method": "edit", "source": "a lemon cake", "targets": ["a lego cake", "a beet cake"],
                             "cross": [0.1, 0.8], "reweight": {"lego": 2}, "blend": ["cake"], "seed": 4})
    line = cli_line(request, model="tiny", out="outputs/e")
    assert line == ("attnkit edit 'a lemon cake' --to 'a lego cake' --to 'a beet cake' --cross 0.1,0.8 "
                    "--blend cake --reweight lego=2 --seed 4 --model tiny --out outputs/e")
    windowed = parse_request({"method": "maps", "prompt": "a red circle", "window": [0.5, 1.0]})
    fallback = cli_line(windowed, out="outputs/m")
    assert fallback.startswith("echo ") and fallback.endswith("| attnkit batch - --out outputs")
    assert '"window": [0.5, 1.0]' in fallback and '"id": "m"' in fallback


def test_a_method_is_one_registry_entry():
    def run(pipe, args, ctx):
        raise NotImplementedError

    method = Method("echo-test", "A test entry.", (Field("text", "text", required=True, cli="arg"),), run)
    register(method)
    try:
        assert get_method("echo-test") is method
        assert parse_request({"method": "echo-test", "text": "hi"}).args == {"text": "hi"}
        with pytest.raises(ValueError, match="registered twice"):
            register(method)
    finally:
        REGISTRY.pop("echo-test")
