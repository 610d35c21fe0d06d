"""align_spans (docs/tea.md §2): the pairing of prompt-level TEA where the class word is several tokens (Flux's T5),
on hand-made token ids: 1 start, 9 end, 0 padding; placeholder 50 51, class word 70 71 72."""
import pytest

from persviz.tea.adjust import align_positions, align_spans


def test_the_placeholder_before_a_class_word_of_several_tokens_pairs_with_its_first_tokens():
    # "a sks teapot on" vs "a teapot on": sks's two tokens pair with the class word's first two, teapot with itself
    personal = [1, 5, 50, 51, 70, 71, 72, 6, 9, 0, 0]
    cls = [1, 5, 70, 71, 72, 6, 9, 0, 0, 0, 0]
    assert align_spans(personal, cls, [50, 51], [70, 71, 72]) == [
        (0, 0), (1, 1), (2, 2), (3, 3), (4, 2), (5, 3), (6, 4), (7, 5), (8, 6), (9, 7), (10, 8)]


def test_a_placeholder_in_place_of_the_class_word_pairs_token_t_with_class_token_min_t_k_minus_1():
    cls = [1, 5, 70, 71, 72, 6, 9, 0]
    # one token for three: it pairs with the first; the class word's other two tokens stay unpaired
    assert align_spans([1, 5, 50, 6, 9, 0, 0, 0], cls, [50], [70, 71, 72]) == [
        (0, 0), (1, 1), (2, 2), (3, 5), (4, 6), (5, 7)]
    # four tokens for two: the extra ones pair with the class word's last token
    assert align_spans([1, 5, 50, 51, 52, 53, 6, 9], [1, 5, 70, 71, 6, 9, 0, 0], [50, 51, 52, 53], [70, 71]) == [
        (0, 0), (1, 1), (2, 2), (3, 3), (4, 3), (5, 3), (6, 4), (7, 5)]


def test_with_a_one_token_class_word_it_is_align_positions():
    personal, cls = [1, 5, 50, 51, 70, 6, 9, 0], [1, 5, 70, 6, 9, 0, 0, 0]
    assert align_spans(personal, cls, [50, 51], [70]) == align_positions(personal, cls, [50, 51], 70)
    assert align_spans(personal, cls, [50, 51], [70]) == [(0, 0), (1, 1), (2, 2), (3, 2), (4, 2), (5, 3), (6, 4),
                                                          (7, 5)]


def test_prompts_that_differ_elsewhere_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="identical apart from the placeholder"):
        align_spans([1, 5, 50, 70, 71, 6, 9], [1, 8, 70, 71, 6, 9, 0], [50], [70, 71])
    with pytest.raises(ValueError, match="do not occur"):
        align_spans([1, 5, 70, 71, 9], [1, 5, 70, 71, 9], [50], [70, 71])
