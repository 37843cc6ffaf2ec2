"""One APIRouter per resource; routes parse, authorise and call ``registry.crud``."""
