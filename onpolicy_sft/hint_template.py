"""The prompts of Hinted Decoding's two streams (docs/methods.md §5).

The hinted stream reads a rewriting instruction, the question and the full reference solution;
the student stream reads the question alone in the plain chat template. Optionally (stage 1)
the model first writes its own short reading of the solution, greedily, and the hinted stream
continues after that analysis, cut at a marker such as the heading under which the solution
starts. The wording is ours and every piece is a user-overridable format string.
"""

from __future__ import annotations

from dataclasses import dataclass

from onpolicy_sft.encoding import encode_prompt


@dataclass
class HintTemplate:
    """Format strings of the hinted stream. Fields {question}, {solution}, {marker} are filled in.

    ``analysis_marker``: with stage 1 on, the model's analysis is kept up to and including the
    first occurrence of this text (the instruction asks it to write the marker before its own
    solution); an analysis that never writes it is dropped entirely.
    """

    instruction: str = (
        "Below is a question and a correct reference solution. Solve the question yourself, in your own "
        "words and your usual style, arriving at the same final answer. Do not mention that you were given "
        "a solution. Put the final answer in \\boxed{{}}.\n\n"
        "Question:\n{question}\n\nReference solution:\n{solution}"
    )
    analysis_instruction: str = (
        "\n\nFirst write two or three sentences about the key idea of the reference solution. "
        "Then write the line \"{marker}\" and give your own full solution."
    )
    analysis_marker: str = "My solution:"
    system: str = ""
    # Whether the hinted stream also sees the row's exemplar turns before its instruction. The
    # student stream always does: its prompt is the one the rewrite is trained and scored under;
    # the hinted prompt only steers.
    exemplars: bool = True

    def hinted_text(self, question: str, solution: str, analysis: bool = False) -> str:
        text = self.instruction.format(question=question, solution=solution, marker=self.analysis_marker)
        if analysis:
            text += self.analysis_instruction.format(question=question, solution=solution, marker=self.analysis_marker)
        return text


def student_prompt_ids(tokenizer, question: str, system: str = "", exemplars=()) -> list[int]:
    """The question in the plain chat template after its exemplar turns (the context DDT scores
    responses under)."""
    return encode_prompt(tokenizer, question, system, exemplars)


def hinted_prompt_ids(tokenizer, template: HintTemplate, question: str, solution: str, analysis: bool = False,
                      exemplars=()) -> list[int]:
    """The hinted stream's prompt, ending with the assistant turn's opening: the hint in the last
    user turn, after the exemplar turns where ``template.exemplars`` says so."""
    return encode_prompt(tokenizer, template.hinted_text(question, solution, analysis), template.system,
                         exemplars if template.exemplars else ())


def cut_analysis(text: str, marker: str) -> str | None:
    """The analysis up to and including the first `marker` (plus the line break after it), or
    None when the model never wrote the marker."""
    at = text.find(marker)
    if at < 0:
        return None
    end = at + len(marker)
    if text[end : end + 1] == "\n":
        end += 1
    return text[:end]


def with_analysis(tokenizer, hinted_ids: list[int], analysis: str | None) -> list[int]:
    """The hinted prompt followed by the stage-1 analysis (tokens appended inside the assistant turn)."""
    if not analysis:
        return list(hinted_ids)
    return list(hinted_ids) + tokenizer(analysis, add_special_tokens=False)["input_ids"]
