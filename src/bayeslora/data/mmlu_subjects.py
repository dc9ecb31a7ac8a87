"""MMLU's 57 subjects and the subject groups a task name can select.

The grouping is the one shipped with the MMLU release (``hendrycks/test``, ``categories.py``): each
subject has a subcategory (``physics``, ``law``, ...) and each subcategory belongs to one of four
categories (STEM, humanities, social sciences, other). Task names:

* ``mmlu`` or ``mmlu_all``: all 57 subjects;
* ``mmlu_<subject>`` e.g. ``mmlu_college_chemistry``;
* ``mmlu_chem`` = college_chemistry and ``mmlu_phy`` = college_physics (the OOD pair BLoB evaluates);
* ``mmlu_stem``, ``mmlu_humanities``, ``mmlu_social_sciences``, ``mmlu_other``: the four categories;
* ``mmlu_sub_<subcategory>`` e.g. ``mmlu_sub_chemistry`` (college + high-school chemistry),
  ``mmlu_sub_computer_science`` (spaces in subcategory names become underscores);
* ``mmlu:<subject>[,<subject>...]``: any explicit list.
"""

from __future__ import annotations

SUBCATEGORY: dict[str, str] = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer_science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer_science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer_science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer_science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}
"""Subject -> subcategory, as in the MMLU release."""

CATEGORY: dict[str, tuple[str, ...]] = {
    "stem": ("physics", "chemistry", "biology", "computer_science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social_sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),
}
"""Category -> its subcategories, as in the MMLU release."""

SUBJECTS: tuple[str, ...] = tuple(sorted(SUBCATEGORY))

ALIASES: dict[str, tuple[str, ...]] = {
    "chem": ("college_chemistry",),
    "phy": ("college_physics",),
}
"""Short names used by the OOD protocol (METHOD.md section 7, following BLoB)."""


def subjects_in_category(category: str) -> tuple[str, ...]:
    """Subjects of one of the four categories, in alphabetical order."""
    subcategories = CATEGORY[category]
    return tuple(s for s in SUBJECTS if SUBCATEGORY[s] in subcategories)


def resolve_mmlu_subjects(task: str) -> tuple[str, ...]:
    """Map an MMLU task name (see the module docstring) to its subjects; ValueError if unknown."""
    if task.startswith("mmlu:"):
        subjects = tuple(s.strip() for s in task[len("mmlu:") :].split(",") if s.strip())
        unknown = [s for s in subjects if s not in SUBCATEGORY]
        if unknown or not subjects:
            raise ValueError(f"unknown MMLU subject(s) {unknown or '(none given)'} in {task!r}; known: {SUBJECTS}")
        return subjects
    if task in ("mmlu", "mmlu_all"):
        return SUBJECTS
    name = task[len("mmlu_") :] if task.startswith("mmlu_") else None
    if name in ALIASES:
        return ALIASES[name]
    if name in CATEGORY:
        return subjects_in_category(name)
    if name in SUBCATEGORY:
        return (name,)
    if name and name.startswith("sub_"):
        picked = tuple(s for s in SUBJECTS if SUBCATEGORY[s] == name[len("sub_") :])
        if picked:
            return picked
    raise ValueError(
        f"unknown MMLU task {task!r}: use mmlu, mmlu_all, mmlu_<subject>, mmlu_chem, mmlu_phy, "
        f"mmlu_{{{','.join(CATEGORY)}}}, mmlu_sub_<subcategory> or mmlu:<subject>,<subject>"
    )
