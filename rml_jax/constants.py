"""Names and values that several modules share."""

# The label of pixels that carry no class: unlabeled, crop padding, eval padding.
IGNORE_LABEL = 255

# The four models of a run, in the order of every results table.
TEACHERS = ("teacher_a", "teacher_b")
STUDENTS = ("student_a", "student_b")
MODEL_NAMES = TEACHERS + STUDENTS

# --mode=export's formats (config.export.format).
EXPORT_FORMATS = ("savedmodel", "onnx", "stablehlo")
