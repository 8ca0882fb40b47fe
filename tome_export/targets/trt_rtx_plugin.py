"""placeholder"""
def can_register() -> bool:
    return False
