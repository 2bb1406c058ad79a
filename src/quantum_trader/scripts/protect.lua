-- Fire one protective exit: publish its decision and mark the levels fired, atomically.
-- KEYS[1] protective stops hash, KEYS[2] the book's positions hash, KEYS[3] decision stream.
-- ARGV: symbol, the stop as read, the position as read, the stop marked fired, then the decision's fields.
-- Runs only while the stop and the position are still those the client read (else 0: it reads again),
-- so an exit is published once per armed stop and sells the position as it stands.
local symbol = ARGV[1]
if redis.call('HGET', KEYS[1], symbol) ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[2], symbol) ~= ARGV[3] then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('HSET', KEYS[1], symbol, ARGV[4])
return 1
