-- Operators: the people who log in to the console (or call the API with HTTP Basic) under
-- their own name, so the audit log says who acted. The admin token stays the root credential.
-- Only an argon2id hash of each password is kept (a PHC string: algorithm, parameters, salt).
CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    created_by    TEXT NOT NULL
);
