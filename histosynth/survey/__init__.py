"""Reader study: can pathologists tell synthetic tiles from real ones?

``study`` builds a blinded study folder (images plus an answer key that is never served), ``app`` is the small web
app readers answer in, and ``report`` turns the answers into accuracy, sensitivity/specificity, agreement and ROC.
"""
