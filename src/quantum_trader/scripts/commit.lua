-- Execution batch commit: acknowledge each intent and write its one result, atomically.
-- KEYS[1] intent stream, KEYS[2] result stream, KEYS[3] counted-intents hash,
-- KEYS[4] legacy result stream (optional: dual write when present).
-- ARGV: group, then per intent: entry_id, n_fields, result fields...
-- The XACK gates the write: an intent another consumer already finished gets no second result.
-- Returns the number of results written.
local group = ARGV[1]
local pos = 2
local written = 0
while pos <= #ARGV do
  local id = ARGV[pos]
  local n = tonumber(ARGV[pos + 1])
  local fields = {}
  for j = 1, n do fields[j] = ARGV[pos + 1 + j] end
  pos = pos + 2 + n
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    if KEYS[4] then redis.call('XADD', KEYS[4], '*', unpack(fields)) end
    redis.call('HDEL', KEYS[3], id)
    written = written + 1
  end
end
return written
