"""What the docs show that the code can say for itself."""

from __future__ import annotations

from serving import bad_input


def test_the_refusals_table_in_the_docs_is_the_codes():
    text = bad_input.DOCS.read_text()
    assert bad_input.BEGIN in text, "docs/serving.md lost its table of refusals"
    assert text == bad_input.written(text), (
        "docs/serving.md's table of refusals differs from the messages the handler gives: "
        "python -m serving.bad_input --write"
    )


def test_every_case_is_refused_with_a_message_naming_the_part():
    for case in bad_input.cases():
        message = bad_input.message(case)
        where = "form field" if case.files else "the request body"
        # Two files name no one part: the request as a whole is wrong.
        assert where in message or case.name == "two files", (case.name, message)
