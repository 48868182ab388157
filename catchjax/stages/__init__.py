"""Pipeline stages: organism -> catch -> train_against -> measure (+ distinguish)."""
