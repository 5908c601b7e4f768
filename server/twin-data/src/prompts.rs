//! The TWIN and FGVQA question texts and the two ways they reach a model: the training prompt
//! (image tokens, a blank line, the question) and the evaluation text (question + answer-format
//! instruction).
//!
//! Every text is the reference's, byte for byte, typos included: a model post-trained on one
//! wording and evaluated on another measures the wording, not the recipe. `tests/prompts.rs`
//! pins them.

/// The image placeholder the training prompt carries once per image (verl / Qwen-VL chat layout).
pub const IMAGE_TOKEN: &str = "<image>";

/// TWIN's pair question. "explained context" (without "by") is the reference text, unlike
/// [`MULTI_QUESTION`]; keep it.
pub const PAIR_QUESTION: &str = "Are these images of the same or identical products? For two products to be considered identical, minor changes such as those that can be explained context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then conclude with a yes or no answer in <answer> tags as <answer>yes</answer> or <answer>no</answer>.";

/// TWIN's multi question: a reference image followed by three candidates; the answer is how many
/// candidates show the reference's instance (0–3).
pub const MULTI_QUESTION: &str = "The first image is a reference image. How many of the other images depict the same or identical products as the reference image? For two products to be considered identical, minor changes such as those that can be explained by context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then answer with a number from 0 to 3 in <answer> tags as <answer>n</answer>.";

/// Appended to the question at evaluation, with no separator (the reference concatenates).
pub const EVAL_ANSWER_INSTRUCTION: &str =
    "You MUST include an explanation AND use the answer tags <answer></answer>.";

/// FGVQA's CUB subset (bird species).
pub const CUB_PAIR_QUESTION: &str = "Do these two images show a bird of the same species?";
/// FGVQA's MET subset (artworks).
pub const MET_PAIR_QUESTION: &str = "Do these two images contain the same piece of art?";
/// FGVQA's LANDMARKS subset.
pub const LANDMARKS_PAIR_QUESTION: &str = "Do these two images contain the same landmark?";
/// FGVQA's ILIAS subset (instance-level retrieval).
pub const ILIAS_PAIR_QUESTION: &str = "Do these images depict the same instance?";
/// FGVQA's INQUIRE subset (animal species).
pub const INQUIRE_PAIR_QUESTION: &str =
    "Do these images show an animal of the same scientific species?";

/// FGVQA subsets and their default pair questions, lower-case subset names.
pub const FGVQA_PAIR_QUESTIONS: &[(&str, &str)] = &[
    ("twin", PAIR_QUESTION),
    ("cub", CUB_PAIR_QUESTION),
    ("met", MET_PAIR_QUESTION),
    ("landmarks", LANDMARKS_PAIR_QUESTION),
    ("ilias", ILIAS_PAIR_QUESTION),
    ("inquire", INQUIRE_PAIR_QUESTION),
];

/// The default pair question of an FGVQA subset, by name (case-insensitive), or `None` for a
/// subset this table does not know.
pub fn default_pair_question(subset: &str) -> Option<&'static str> {
    FGVQA_PAIR_QUESTIONS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(subset))
        .map(|&(_, question)| question)
}

/// The one user message of a training record: `<image>\n` once per image, then `\n` and the
/// question — `"<image>\n<image>\n\n{question}"` for a pair, four image lines for a multi
/// question.
pub fn training_prompt(question: &str, images: usize) -> String {
    let mut prompt = String::with_capacity(question.len() + images * (IMAGE_TOKEN.len() + 1) + 1);
    for _ in 0..images {
        prompt.push_str(IMAGE_TOKEN);
        prompt.push('\n');
    }
    prompt.push('\n');
    prompt.push_str(question);
    prompt
}

/// The text a model sees at evaluation: the question immediately followed by
/// [`EVAL_ANSWER_INSTRUCTION`].
pub fn eval_text(question: &str) -> String {
    let mut text = String::with_capacity(question.len() + EVAL_ANSWER_INSTRUCTION.len());
    text.push_str(question);
    text.push_str(EVAL_ANSWER_INSTRUCTION);
    text
}
