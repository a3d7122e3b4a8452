"""The paper's protocol and its figures."""
