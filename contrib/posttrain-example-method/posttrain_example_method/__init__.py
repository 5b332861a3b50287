"""posttrain-example-method: SFT with input token dropout, packaged the way an outside lab would.

Keep this file light: ``posttrain list`` imports ``posttrain_example_method._spec``, which imports
this package first. Use the method through the gate::

    from posttrain.experimental.example_method import TokenDropoutSFTTrainer, TokenDropoutSFTConfig
"""
