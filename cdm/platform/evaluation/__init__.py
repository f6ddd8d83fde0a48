"""The production composite measured: FID with its noise floor, the likelihood bound, memorization and membership,
one verdict per figure from its interval (`evaluate`); prompt alignment of a text composite (`text_evaluate`).

May import: `workspace`, `stack`, `data`, `models`.
"""
