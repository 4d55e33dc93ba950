"""The user's own variant (``user_variant.py``) is imported before collection, so the contract
suite (``test_contract.py``) checks it like the library's methods: registering is all it takes."""

import tests.methods.user_variant  # noqa: F401 - imported for its registration
