// STUB: replaced by the real reader.
#include "gguf.h"
namespace glmoe {
bool GGUFValue::is_integer() const { return false; }
std::unique_ptr<GGUFFile> GGUFFile::open(const std::string& path) { throw GGUFError("not implemented"); }
GGUFFile::~GGUFFile() {}
const GGUFValue* GGUFFile::find(const std::string&) const { return nullptr; }
const GGUFTensorInfo* GGUFFile::find_tensor(const std::string&) const { return nullptr; }
}
