"""One APIRouter per resource; routes parse, authorise and call ``modelhash.registry.crud``."""
